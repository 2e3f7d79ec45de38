"""Model families by the `architectures` entry of `config.json`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from valora.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_cls: type[nn.Module]
    processor_cls: type


def _families() -> dict[str, Family]:
    from valora.models.internvl import InternVLForConditionalGeneration, InternVLInputProcessor
    from valora.models.llava import LlavaForConditionalGeneration, LlavaInputProcessor
    from valora.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from valora.models.qwen2_vl import Qwen2VLForConditionalGeneration, Qwen2VLInputProcessor

    return {
        "Qwen2VLForConditionalGeneration": Family("qwen2_vl", Qwen2VLForConditionalGeneration, Qwen2VLInputProcessor),
        "Qwen2_5_VLForConditionalGeneration": Family("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration,
                                                     Qwen2VLInputProcessor),
        "LlavaForConditionalGeneration": Family("llava", LlavaForConditionalGeneration, LlavaInputProcessor),
        "InternVLForConditionalGeneration": Family("internvl", InternVLForConditionalGeneration,
                                                   InternVLInputProcessor),
    }


def resolve_family(hf_config) -> Family:
    families = _families()
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in families:
            return families[arch]
    by_type = {f.name: f for f in families.values()}
    model_type = getattr(hf_config, "model_type", None)
    if model_type in by_type:
        return by_type[model_type]
    raise UserError(
        f"unsupported model (architectures={archs}, model_type={model_type!r}); "
        f"supported: {', '.join(sorted(families))}"
    )
