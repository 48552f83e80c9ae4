"""Model compression: weight quantization (round to nearest, GPTQ, AWQ), pruning and
distillation. Every method writes an ordinary model directory that every command reads."""
