"""Quantization settings: one dataclass, validated on construction, saved into the checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .models.adapter import DEFAULT_TARGETS
from .quant.quantizer import QuantSpec

METHODS = ("rtn", "gptq", "agq", "moequant")
TARGETS = ("experts", "shared", "attn", "dense", "router")
CALIBRATION_MODES = ("routed", "all-experts")
EMPTY_EXPERT_POLICIES = ("rtn", "identity", "error")


@dataclass
class QuantConfig:
    method: str = "agq"  # rtn | gptq (routed tokens, uniform weights) | agq (affinity-weighted) | moequant (EBSS + AGQ)
    bits: int = 4
    group_size: int = 128  # -1: per output channel
    sym: bool = True
    mse_clip: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    targets: tuple = DEFAULT_TARGETS  # which linears: experts, shared, attn, dense (router: opt-in)
    calibration: str = "routed"  # routed: each expert sees its routed tokens; all-experts: every token, weight 1
    empty_expert: str = "rtn"  # policy for an expert with no calibration tokens (always logged + recorded)
    affinity_power: int = 1  # AGQ weight c**p (Eq. 19 uses p=1; p=2 is the exact output-error weight)
    shared_affinity: bool = True  # AGQ for Qwen's shared expert with c = sigmoid(shared_expert_gate(x))
    num_samples: int = 128  # calibration sequences
    seq_len: int = 2048  # tokens per sequence (capped at the model's context)
    calib_file: str | None = None  # text file; default: the English text the package carries
    batch_size: int = 8
    seed: int = 0
    device: str | None = None  # default: cuda if available, else cpu
    rotate: str | None = None  # "hadamard": offline QuaRot-style rotation of the residual stream before quantizing
    rotate_seed: int = 0
    hessian_backend: str = "auto"  # auto (Triton on CUDA, torch on CPU) | torch | triton
    ebss: dict = field(default_factory=dict)  # EBSS parameters for method=moequant (see moequant.calib.ebss)
    # scale (pipeline.py, distributed.py)
    offload_activations: str = "auto"  # on: calibration hidden states in pinned CPU memory, streamed to the GPU per
    #                                    batch; off: on the GPU; auto: on the GPU when the memory estimate fits
    expert_chunk: int = 0  # experts per batched GPTQ solve (0: all of a block; ceil(E / ranks) under torchrun)
    memory_check: bool = True  # estimate every layer's GPU memory up front; fail before any work if it cannot fit
    gptq_backend: str = "auto"  # auto (Triton inner loop on CUDA where it applies, else torch) | torch | triton

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        self.spec  # validates bits and group size
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown targets {bad}; choose from {', '.join(TARGETS)}")
        if self.calibration not in CALIBRATION_MODES:
            raise ValueError(f"calibration {self.calibration!r} is not one of {', '.join(CALIBRATION_MODES)}")
        if self.calibration == "all-experts" and self.method in ("agq", "moequant"):
            raise ValueError("AGQ weights each token by its routed affinity, which an unrouted token does not have: "
                             "use --calibration routed with agq/moequant, or --method gptq with all-experts")
        if self.empty_expert not in EMPTY_EXPERT_POLICIES:
            raise ValueError(f"empty_expert {self.empty_expert!r} is not one of {', '.join(EMPTY_EXPERT_POLICIES)}")
        if self.affinity_power not in (1, 2):
            raise ValueError("affinity_power must be 1 (paper, Eq. 19) or 2")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.num_samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("num_samples, batch_size must be >= 1 and seq_len >= 2")
        if self.rotate not in (None, "hadamard"):
            raise ValueError(f"rotate must be None or 'hadamard', got {self.rotate!r}")
        if self.hessian_backend not in ("auto", "torch", "triton"):
            raise ValueError("hessian_backend must be auto, torch or triton")
        if self.offload_activations not in ("auto", "on", "off"):
            raise ValueError(f"offload_activations must be auto, on or off, got {self.offload_activations!r}")
        if not isinstance(self.expert_chunk, int) or self.expert_chunk < 0:
            raise ValueError(f"expert_chunk must be an integer >= 0 (0: automatic), got {self.expert_chunk!r}")
        if self.gptq_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"gptq_backend must be auto, torch or triton, got {self.gptq_backend!r}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, sym=self.sym, mse_clip=self.mse_clip)

    @property
    def affinity_weighted(self) -> bool:
        return self.method in ("agq", "moequant")

    def to_dict(self):
        return asdict(self)
