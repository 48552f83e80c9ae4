"""Reading and writing the formats the rest of the field uses (Hugging Face layout, GGUF)."""
