"""Recurrent networks: one code path for the RNN, LSTM and GRU cells (torch's nn.RNN, nn.LSTM and
nn.GRU, which run on cuDNN on a GPU), with two heads:

- a classifier, over token sequences (through an embedding) or images read row by row; it takes
  the final state, or the mean over each sequence's true length. Padded batches go through the
  cell as packed sequences, so padding never changes a result.
- a language model: logits for the next token at every step, the hidden state handed back so
  that a caller can carry it to the next window; the output layer may share the embedding's
  weights (weight tying, as in pytorch/examples' word_language_model).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..config.models import RNNConfig
from ..data import DataInfo
from . import Model

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # LSTM: (h, c)


def make_cell(name: str, input_size: int, hidden_size: int, layers: int, dropout: float,
              bidirectional: bool = False) -> nn.RNNBase:
    # torch applies the dropout between stacked layers only, and warns when there is one layer
    return CELLS[name](input_size, hidden_size, num_layers=layers, batch_first=True,
                       dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional)


class RNNClassifier(Model):
    def __init__(self, cell: str, num_classes: int, hidden_size: int, layers: int = 1,
                 dropout: float = 0.0, bidirectional: bool = False, pooling: str = "last",
                 vocab_size: int = 0, embedding_size: int = 0, input_size: int = 0):
        super().__init__()
        # tokens go through an embedding (index 0 is padding); image rows are already vectors
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=0) if vocab_size else None
        self.rnn = make_cell(cell, embedding_size if vocab_size else input_size, hidden_size,
                             layers, dropout, bidirectional)
        self.pooling = pooling
        self.directions = 2 if bidirectional else 1
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size * self.directions, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)  # (B, T) -> (B, T, E)
        else:
            x = x.permute(0, 2, 1, 3).flatten(2)  # images (B, C, H, W) -> rows (B, H, C*W)
        if lengths is not None:  # packed: the cell stops at each sequence's true end
            x = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, hidden = self.rnn(x)
        if self.pooling == "last":
            h = hidden[0] if isinstance(hidden, tuple) else hidden  # (layers * dirs, B, H)
            features = torch.cat(list(h[-self.directions:]), dim=1)  # (B, H * dirs)
        elif lengths is not None:
            out, _ = pad_packed_sequence(out, batch_first=True)  # (B, T, H * dirs), zero-padded
            features = out.sum(1) / lengths.to(out.device, out.dtype).unsqueeze(1)
        else:
            features = out.mean(1)
        return self.head(self.dropout(features))  # (B, num_classes)

    def exportable(self) -> nn.Module:
        """Token classifiers: the same function without packed sequences, which torch.export and
        the ONNX exporter cannot take; image rows are never packed."""
        return self if self.embedding is None else Unpacked(self)


class Unpacked(nn.Module):
    """An RNNClassifier of tokens run over the padded batch, as exporters take it, giving what
    packing gives: each layer and direction is its own one-layer cell (the classifier's weights);
    the forward direction reads the padding only after a sequence's end, and the backward one
    reads each sequence reversed within its length, so neither sees padding before the state
    that counts; the final state is read at each sequence's last token, the mean over its
    length. In eval mode only (no dropout)."""

    def __init__(self, model: RNNClassifier):
        super().__init__()
        rnn = model.rnn
        cell = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn"}[type(rnn)]
        self.embedding, self.head, self.pooling = model.embedding, model.head, model.pooling
        self.cells = nn.ModuleList()
        for layer in range(rnn.num_layers):
            for suffix in ("", "_reverse")[:model.directions]:
                one = make_cell(cell, rnn.hidden_size * model.directions if layer else rnn.input_size,
                                rnn.hidden_size, 1, 0.0)
                if cell == "rnn":
                    one.nonlinearity = rnn.nonlinearity
                one.load_state_dict({name: getattr(rnn, name.replace("_l0", f"_l{layer}{suffix}"))
                                     for name, _ in one.named_parameters()})
                self.cells.append(one)
        self.directions = model.directions

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)  # (B, T, E)
        steps = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)  # (1, T)
        last = (lengths.to(tokens.device) - 1).unsqueeze(1)  # (B, 1)
        # each sequence reversed within its length, the padding left where it is (its own inverse)
        reverse = torch.where(steps <= last, last - steps, steps)  # (B, T)
        for layer in range(len(self.cells) // self.directions):
            outs, ends = [], []
            for direction in range(self.directions):
                cell = self.cells[layer * self.directions + direction]
                out = cell(_gather(x, reverse) if direction else x)[0]  # (B, T, H)
                ends.append(_gather(out, last))  # (B, 1, H): the state after the last token
                outs.append(_gather(out, reverse) if direction else out)
            x = torch.cat(outs, dim=2)  # (B, T, H * dirs)
        if self.pooling == "last":
            features = torch.cat(ends, dim=2).squeeze(1)  # (B, H * dirs)
        else:
            valid = (steps <= last).unsqueeze(2).to(x.dtype)  # (B, T, 1)
            features = (x * valid).sum(1) / lengths.to(x.device, x.dtype).unsqueeze(1)
        return self.head(features)  # (B, num_classes)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) at positions index (B, T') of each row: (B, T', D)."""
    return x.gather(1, index.unsqueeze(2).expand(-1, -1, x.shape[2]))


class RNNLanguageModel(Model):
    def __init__(self, cell: str, vocab_size: int, embedding_size: int, hidden_size: int,
                 layers: int = 1, dropout: float = 0.0, tie_weights: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.rnn = make_cell(cell, embedding_size, hidden_size, layers, dropout)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        # small uniform embedding and output weights, as in word_language_model
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:  # one matrix for reading and writing tokens (needs embedding == hidden)
            self.decoder.weight = self.embedding.weight

    def forward(self, x: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        emb = self.dropout(self.embedding(x))  # (B, T) -> (B, T, E)
        out, hidden = self.rnn(emb, hidden)  # (B, T, H)
        return self.decoder(self.dropout(out)), hidden  # (B, T, V)


def build(cfg: RNNConfig, info: DataInfo) -> RNNClassifier | RNNLanguageModel:
    """A language model on character data, else a classifier (of texts, or of image rows)."""
    common = {"hidden_size": cfg.hidden_size, "layers": cfg.layers, "dropout": cfg.dropout}
    if info.kind == "chars":
        return RNNLanguageModel(cfg.name, len(info.vocabulary), cfg.embedding_size,
                                tie_weights=cfg.tie_weights, **common)
    if info.kind == "text":
        sizes = {"vocab_size": len(info.vocabulary), "embedding_size": cfg.embedding_size}
    else:  # image rows: H steps of C x W values
        sizes = {"input_size": info.in_channels * info.image_size[1]}
    return RNNClassifier(cfg.name, info.num_classes, bidirectional=cfg.bidirectional,
                         pooling=cfg.pooling, **sizes, **common)
