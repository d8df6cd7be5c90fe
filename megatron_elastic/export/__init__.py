"""Export of trained budgets as standalone models, and the formats they are written in:
:mod:`.standalone` (the sliced model), :mod:`.hf` (Hugging Face), :mod:`.megatron_lm`
(Megatron-LM / Megatron-Bridge), :mod:`.gguf` (llama.cpp). Name tables: :mod:`.hf_mapping`,
:mod:`.te_mapping`, :mod:`.gguf_mapping`. Nothing is imported here, so that the model package
can read the name tables without importing the exporters."""
