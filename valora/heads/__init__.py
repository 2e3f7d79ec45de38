"""Vision task heads: closed-set tasks answered from one prefill instead of decoding text.

A head is a small MLP on the LM's final hidden state (after the last norm) at the prompt's last token, the same
state the LM head reads to predict the first answer token. A classification head scores class labels; a box head
regresses a normalised bounding box. Heads are trained with their LoRA adapter (`valora adapters build`) and saved
beside it in the adapter directory (`artifact.py` describes the files); the engine answers a request that asks
for a head (`HeadParams`) after its prefill and finishes it with no decode step.
"""

from valora.heads.artifact import HeadNames, HeadSet, load_heads, save_heads
from valora.heads.modules import HeadConfig, TaskHead, answer_all, pool_last
from valora.heads.params import HeadParams

__all__ = ["HeadConfig", "HeadNames", "HeadParams", "HeadSet", "TaskHead", "answer_all", "load_heads", "pool_last",
           "save_heads"]
