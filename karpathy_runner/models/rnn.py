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
