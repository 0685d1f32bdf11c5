"""The local model store (``$SHARDLM_HOME``) and the conversion of the embedded GGUF model into
a Hugging Face checkpoint (``shardlm fetch``)."""
