"""The typed config tree: defaults for every key, YAML loading, dotted overrides, validation.

families.py  the family bases (data, model, task), their open registries and `register`
data.py, models.py, tasks.py   the built-in families' branches
training.py  optimizer, scheduler and train branches
root.py      the whole Config, derived defaults, rules between branches, the config hash
loading.py   YAML files and --set overrides -> a validated Config (load_config, resolve)
messages.py  validation errors as one line per key
reference.py the config reference (docs/config.md) as Markdown, from the classes above
safe_yaml.py YAML from files kdl does not trust

Importing this package imports none of them (no pydantic): `kdl runs` starts fast.
"""
