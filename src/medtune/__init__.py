"""medtune: turn a general LLM (default Qwen3-4B) into a Chinese medical QA assistant."""
__version__ = "0.1.0"
