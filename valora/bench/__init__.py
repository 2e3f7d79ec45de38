"""`valora bench`: trace-driven end-to-end benchmark of OpenAI-compatible multi-LoRA servers (docs/bench.md).

workload (what is sent when) -> client (open-loop streaming replay, one record per request) -> scrape (the
server's /metrics timeline) -> results (raw JSONL per point) -> summary (metrics) -> plots and report.
`sweep` runs it per scheduler over rates, skews and task mixes.
"""
