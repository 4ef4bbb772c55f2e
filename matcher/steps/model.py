"""The learned shared space: projection heads, fusion and the matching network; saved as safetensors."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from matcher.steps.baselines import DEAD_COLUMN, DEAD_COLUMN_STD

FUSION_MODES = ("weighted", "concat", "concat_weighted")


class ModelError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    image_dim: int
    text_dim: int
    dim: int
    hidden: int
    fusion: str
    fusion_alpha: float
    image_encoder: str
    text_encoder: str
    head: str = "mlp"  # mlp | mlp+linear (a linear path beside the MLP, seeded with a closed-form solution)
    image_power: float = 1.0  # photo features are raised to this power (signed) before standardising; 1 = as extracted
    text_columns: int = 0  # the text head reads the features' first this many columns (0: all), e.g. without the
    # title-words view (train.title_words)


HEADS = ("mlp", "mlp+linear")


class ProjectionHead(nn.Module):
    """Frozen encoder features (their first `columns`; 0: all) raised to `power` (signed) and standardised, then a
    two-layer MLP into the shared space (L2-normalised); with `linear`, plus a linear map of the same input, so a
    closed-form solution can be the starting point."""

    def __init__(self, in_dim: int, hidden: int, dim: int, linear: bool = False, power: float = 1.0,
                 columns: int = 0):
        super().__init__()
        if not 0 <= columns <= in_dim:
            raise ModelError(f"a head over {in_dim} feature columns cannot read the first {columns}")
        self.power = power  # from the model's spec, which is saved beside the weights
        self.columns = columns
        in_dim = columns or in_dim
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, dim))
        self.linear = nn.Linear(in_dim, dim) if linear else None

    def inputs(self, feats: torch.Tensor) -> torch.Tensor:
        """The columns the head reads, powered."""
        feats = feats[:, :self.columns] if self.columns else feats
        return feats if self.power == 1.0 else torch.sign(feats) * feats.abs().pow(self.power)

    def set_standardisation(self, feats: torch.Tensor) -> None:
        x = self.inputs(feats)
        self.mean.copy_(x.mean(0))
        std = x.std(0)
        self.std.copy_(torch.where(std < DEAD_COLUMN, torch.full_like(std, DEAD_COLUMN_STD), std))

    def standardised(self, feats: torch.Tensor) -> torch.Tensor:
        """What the MLP and the linear path read: the head's inputs, standardised."""
        return self._standardise(self.inputs(feats))

    def _standardise(self, inputs: torch.Tensor) -> torch.Tensor:
        return (inputs - self.mean) / self.std

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.project(self.inputs(feats))

    def project(self, inputs: torch.Tensor) -> torch.Tensor:
        """The head on rows of inputs() (training takes the power of every row once, not once a batch)."""
        x = self._standardise(inputs)
        out = self.net(x) if self.linear is None else self.net(x) + self.linear(x)
        return F.normalize(out, dim=-1)

    @torch.no_grad()
    def start_from_linear(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Make the head compute normalise(x_std @ weight.T + bias) exactly: the MLP's output layer starts at zero
        (training then learns what the linear map misses)."""
        if self.linear is None:
            raise ModelError("this head has no linear path")
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(bias)
        self.net[-1].weight.zero_()
        self.net[-1].bias.zero_()


def fuse(z: torch.Tensor, u: torch.Tensor, mode: str, alpha: float) -> torch.Tensor:
    """v = a*z + (1-a)*u (weighted), [z, u] (concat) or [a*z, (1-a)*u] (concat_weighted)."""
    if mode == "weighted":
        return alpha * z + (1.0 - alpha) * u
    if mode == "concat":
        return torch.cat([z, u], dim=-1)
    if mode == "concat_weighted":
        return torch.cat([alpha * z, (1.0 - alpha) * u], dim=-1)
    raise ModelError(f"unknown fusion mode {mode!r}")


class MatchingNetwork(nn.Module):
    """s = sigmoid(N(v)) where v fuses a photo's z and a text's u: does this photo belong with this text?

    N is an MLP over v and v's second-order terms (v*v for the weighted sum, whose total is a monotone function of
    cos(z, u); the product of the two halves for concatenations), since agreement between the two modalities is a
    quadratic property of v that a small MLP on v alone learns only slowly."""

    def __init__(self, dim: int, fusion: str, alpha: float, hidden: int = 256):
        super().__init__()
        self.fusion, self.alpha, self.dim = fusion, alpha, dim
        in_dim = 2 * dim if fusion == "weighted" else 3 * dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Logits; apply sigmoid for the match probability."""
        v = fuse(z, u, self.fusion, self.alpha)
        second_order = v * v if self.fusion == "weighted" else v[..., : self.dim] * v[..., self.dim:]
        return self.net(torch.cat([v, second_order], dim=-1)).squeeze(-1)


class MatcherModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.fusion not in FUSION_MODES:
            raise ModelError(f"unknown fusion mode {spec.fusion!r}")
        if spec.head not in HEADS:
            raise ModelError(f"unknown head {spec.head!r}")
        self.spec = spec
        linear = spec.head == "mlp+linear"
        self.image_head = ProjectionHead(spec.image_dim, spec.hidden, spec.dim, linear, spec.image_power)
        self.text_head = ProjectionHead(spec.text_dim, spec.hidden, spec.dim, linear, columns=spec.text_columns)
        self.matcher = MatchingNetwork(spec.dim, spec.fusion, spec.fusion_alpha)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))
        # Match probability at or above which a photo and a text are called a match (set after training).
        self.register_buffer("match_threshold", torch.tensor(0.5))

    def embed_images(self, feats: torch.Tensor) -> torch.Tensor:
        return self.image_head(feats)

    def embed_texts(self, feats: torch.Tensor) -> torch.Tensor:
        return self.text_head(feats)

    def product_vectors(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A product's fused vector (normalised), used for recommendations; a normalised concatenation scores
        the mean of the image and text cosine similarities."""
        return F.normalize(fuse(z, u, self.spec.fusion, self.spec.fusion_alpha), dim=-1)

    def match_probability(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.matcher(z, u))


def model_to_bytes(model: MatcherModel) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_safetensors(state, metadata={"spec": json.dumps(asdict(model.spec))})


def model_from_bytes(data: bytes, spec: ModelSpec) -> MatcherModel:
    model = MatcherModel(spec)
    try:
        state = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise ModelError(f"model weights are not a readable safetensors file ({exc})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).splitlines()[-1].strip()
        raise ModelError(f"model weights do not fit the model config or this matcher version ({first}); "
                         "retrain with the train stage") from None
    if missing or unexpected:
        raise ModelError(f"model weights do not fit the model config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model


def spec_from_dict(data: dict) -> ModelSpec:
    try:
        # Fields added later have defaults: a model saved before them loads as it was trained.
        fields = ModelSpec.__dataclass_fields__
        return ModelSpec(**{k: data[k] for k in fields if k in data or fields[k].default is dataclasses.MISSING})
    except KeyError as exc:
        raise ModelError(f"model config lacks {exc}") from None
