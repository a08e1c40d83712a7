"""The SGLang attention backend: dense extend + encode, sparse decode via FlashInfer."""
