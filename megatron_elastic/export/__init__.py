"""Export of trained budgets as standalone models, and the formats they are written in:
:mod:`.registry` (one ``Exporter`` per format, the one place a format is added), :mod:`.run`
(``export_budgets``: checkpoint -> every budget's export), :mod:`.standalone` (the sliced model),
:mod:`.megatron` (megatron-elastic's checkpoint), :mod:`.hf` (Hugging Face), :mod:`.megatron_lm`
(Megatron-LM / Megatron-Bridge), :mod:`.gguf` (llama.cpp). Name tables: :mod:`.hf_mapping`,
:mod:`.te_mapping`, :mod:`.gguf_mapping`. Nothing is imported here, so that the model package
can read the name tables without importing the exporters."""
