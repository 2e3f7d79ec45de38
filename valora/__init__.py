"""VaLoRA: one large multimodal model, many LoRA adapters, served accurately and fast."""

from valora.llm import LLM
from valora.lora.request import LoRARequest
from valora.outputs import CompletionOutput, RequestOutput
from valora.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "LoRARequest", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
