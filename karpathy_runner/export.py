"""`kdl export`: a run's model written as a file that runs without kdl (TorchScript, a
torch.export ExportedProgram or ONNX), its preparation of raw inputs included and what a user
needs to feed it (class names, vocabulary, image size, latent size) inside, as kdl.json.

The task says what to export (`Task.export`) with a raw batch of the data as example inputs.
The file is written to a temp folder, loaded back the way a user loads it and run on those
inputs and on a smaller batch (another batch size); where its outputs differ from the eager
model's by more than the tolerance, nothing is written and the export fails. Export runs on the
CPU in float32, whatever the run trained on.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import KdlError
from .evaluate import load_run
from .runfolder import fsio
from .runfolder.writer import RunWriter
from .tasks.base import Export

SUFFIXES = {"torchscript": ".pt", "exported-program": ".pt2", "onnx": ".onnx"}
METADATA = "kdl.json"  # the name of the metadata in every format
EXAMPLES = 64  # inputs of the check; the second check takes fewer (another batch size)
RELATIVE_TOLERANCE = 1e-4  # of the largest output, or absolute below 1

Runner = Callable[..., torch.Tensor]


@dataclass
class Exported:
    path: Path
    difference: float  # the largest absolute difference from the eager model
    count: int  # inputs compared
    examples: str  # what they were
    checked: bool  # False: no runtime at hand to load the file (onnxruntime missing)


def export_run(runs_root: Path, ref: str, fmt: str, checkpoint: str = "best",
               out: Path | None = None) -> Exported:
    if fmt not in SUFFIXES:
        raise KdlError(f"--format {fmt!r}: give one of {', '.join(SUFFIXES)}")
    if out is not None:
        fsio.check_output(out)
    if fmt == "onnx":
        missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
        if missing:
            raise KdlError(f"--format onnx needs the {' and '.join(missing)} package"
                           f"{'s' if len(missing) > 1 else ''}: pip install 'karpathy-runner[export]' "
                           "(onnx, onnxscript, and onnxruntime to check the file), or choose "
                           "--format torchscript or exported-program")
    loaded = load_run(runs_root, ref, checkpoint, "cpu")
    writer = RunWriter(loaded.run.path) if out is None else None  # refuses what is not its own
    exp = loaded.exp
    dataset = exp.data.val or exp.data.test or exp.data.train
    exp.task.train(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation (a scripted detector)
        spec = exp.task.export(dataset.get_batch(torch.arange(min(len(dataset), EXAMPLES))), exp.prepare)
    if spec is None:
        raise KdlError(f"run {loaded.run.id} is a {exp.task.name} run, which has no model to export: "
                       "kdl export writes classifiers, generators, segmenters and detectors")
    if fmt not in spec.formats:
        raise KdlError(f"--format {fmt}: a {exp.task.name} run's model exports only as "
                       f"{' or '.join(spec.formats)}: {spec.why_only}")
    metadata = {**spec.metadata, "run": loaded.run.id, "checkpoint": checkpoint, "format": fmt}
    with tempfile.TemporaryDirectory() as folder:
        written = Path(folder) / f"model{SUFFIXES[fmt]}"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation, the exporters' notes
            WRITERS[fmt](spec, written, json.dumps(metadata))
            runner = LOADERS[fmt](written)
            difference, largest = (None, 0.0) if runner is None else _difference(spec, runner)
        data = written.read_bytes()
    if difference is not None and difference > RELATIVE_TOLERANCE * max(1.0, largest):
        raise KdlError(
            f"the exported {fmt} model drifts from the eager model: its outputs differ by up to "
            f"{difference:.3g} on {len(spec.inputs[0])} {spec.examples}, beyond the tolerance of "
            f"{RELATIVE_TOLERANCE:g} x the largest output. Nothing was written. Try another "
            "--format, and report the run's model if it persists."
        )
    name = f"model-{checkpoint}{SUFFIXES[fmt]}"
    path = fsio.write_output(out, data) if out is not None else writer.write_export(name, data)
    return Exported(path, difference or 0.0, len(spec.inputs[0]), spec.examples, difference is not None)


def _difference(spec: Export, runner: Runner) -> tuple[float, float]:
    """The largest absolute difference from the eager outputs, on the example inputs and on the
    first few of them (a smaller batch: the batch size is free); and the largest eager output of
    the example inputs (the tolerance's scale)."""
    smaller = max(1, len(spec.inputs[0]) // 3)
    difference, scale = 0.0, None
    for inputs in (spec.inputs, tuple(x[:smaller] for x in spec.inputs)):
        got, want = runner(*inputs), spec.reference(*inputs)
        if got.shape != want.shape:
            raise KdlError(f"the exported model gives outputs of shape {tuple(got.shape)} for "
                           f"{tuple(want.shape)}; report the run's model")
        difference = max(difference, float((got.float() - want.float()).abs().max()))
        scale = float(want.abs().max()) if scale is None else scale  # (the example inputs')
    return difference, scale


def _batch_dims(spec: Export) -> tuple[dict[int, object], ...]:
    return tuple({0: torch.export.Dim.DYNAMIC} for _ in spec.inputs)


# ----------------------------------------------------------------------------- the formats


def _torchscript(spec: Export, path: Path, metadata: str) -> None:
    module = spec.module
    if not isinstance(module, torch.jit.ScriptModule):
        module = torch.jit.trace(module, spec.inputs, check_trace=False)
    torch.jit.save(module, str(path), _extra_files={METADATA: metadata})


def _load_torchscript(path: Path) -> Runner:
    return torch.jit.load(str(path), map_location="cpu")


def _exported_program(spec: Export, path: Path, metadata: str) -> None:
    program = _export(spec)
    torch.export.save(program, path, extra_files={METADATA: metadata})


def _load_exported_program(path: Path) -> Runner:
    return torch.export.load(path).module()


def _export(spec: Export) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(spec.module, spec.inputs, dynamic_shapes=_batch_dims(spec))
    except Exception as exc:  # the exporter's many errors: what it could not take
        raise KdlError(f"torch.export could not take this model: {str(exc).splitlines()[0]}; "
                       "--format torchscript traces it instead") from None


def _onnx(spec: Export, path: Path, metadata: str) -> None:
    import onnx

    try:
        program = torch.onnx.export(spec.module, spec.inputs, dynamo=True, external_data=False,
                                    input_names=list(spec.input_names),
                                    output_names=list(spec.output_names),
                                    dynamic_shapes=_batch_dims(spec), verbose=False)
    except Exception as exc:  # the exporter's many errors: what it could not take
        raise KdlError(f"the ONNX exporter could not take this model: {str(exc).splitlines()[0]}; "
                       "--format torchscript traces it instead") from None
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA, metadata
    onnx.save_model(proto, str(path))


def _load_onnx(path: Path) -> Runner | None:
    if importlib.util.find_spec("onnxruntime") is None:
        print(f"onnxruntime is not installed: {path.name} was written but not checked "
              "(pip install onnxruntime)", file=sys.stderr)
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [given.name for given in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
        return torch.from_numpy(session.run(None, feed)[0])

    return run


WRITERS = {"torchscript": _torchscript, "exported-program": _exported_program, "onnx": _onnx}
LOADERS = {"torchscript": _load_torchscript, "exported-program": _load_exported_program,
           "onnx": _load_onnx}


def read_metadata(path: Path) -> dict[str, object]:
    """The kdl.json an exported file carries, by its suffix (for tests and users alike)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        return json.loads(props[METADATA])
    files = {METADATA: ""}
    if path.suffix == ".pt2":
        torch.export.load(path, extra_files=files)
    else:
        torch.jit.load(str(path), _extra_files=files)
    return json.loads(files[METADATA])
