"""Types of the afo package (the extension module afo._afo)."""

import os
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union

__version__: str

_Path = Union[str, "os.PathLike[str]"]
Badge = Literal["SAFE", "WARN", "OVER_CUTLINE"]
FinishReason = Literal["stop", "length", "cancelled"]

class AfoError(RuntimeError):
    """Base class of every error the afo runtime raises."""

class RefusedError(AfoError):
    """The memory ledger refused the run (or a model's load): nothing fits under the cutline."""

    needed_bytes: int
    available_bytes: int
    cutline_bytes: int
    reserved_bytes: int
    margin_bytes: int
    unaccounted_bytes: int
    tried: List[str]
    admission: Optional[Dict[str, Any]]

class ModelError(AfoError):
    """A model could not be loaded or used (missing or invalid file, unsupported architecture, tokenizer)."""

class GenerateResult:
    """The result of Runtime.generate (and of a Stream once exhausted)."""

    @property
    def text(self) -> str: ...
    @property
    def finish_reason(self) -> FinishReason: ...
    @property
    def usage(self) -> Dict[str, int]:
        """{"prompt_tokens", "completion_tokens", "total_tokens"}."""
    @property
    def timings(self) -> Dict[str, Optional[float]]:
        """ttft_ms, latency_ms, prefill_ms, decode_ms, generate_ms, acquire_ms, tokens_per_s, prefill_tokens_per_s."""
    @property
    def badge(self) -> Badge: ...
    @property
    def health_score(self) -> float: ...
    @property
    def peak_memory_bytes(self) -> int: ...
    @property
    def predicted_peak_bytes(self) -> int: ...
    @property
    def cutline_bytes(self) -> int: ...
    @property
    def run_id(self) -> str: ...
    @property
    def model_id(self) -> str: ...
    @property
    def prefix_cache_hit_tokens(self) -> int: ...
    @property
    def cache_hit(self) -> bool: ...
    @property
    def token_budget(self) -> int: ...
    @property
    def admission(self) -> Dict[str, Any]:
        """{"decision", "plan", "tried", "reserved_bytes", "run_bytes", "unaccounted_bytes"}."""

class Stream(Iterator[str]):
    """An iterator of text deltas; `result` is the GenerateResult once exhausted or closed."""

    def __iter__(self) -> "Stream": ...
    def __next__(self) -> str: ...
    def close(self) -> None:
        """Cancel the run if it is still going and wait for its end (its record is written)."""
    @property
    def result(self) -> Optional[GenerateResult]: ...
    def __enter__(self) -> "Stream": ...
    def __exit__(self, *args: Any) -> bool: ...

class ChainResult:
    """The result of Runtime.chain: the analysis, the summary, the stages and the memory."""

    @property
    def run_id(self) -> str: ...
    @property
    def analysis(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def vlm_id(self) -> str: ...
    @property
    def llm_id(self) -> str: ...
    @property
    def shared_instance(self) -> bool: ...
    @property
    def stages(self) -> List[Dict[str, Any]]:
        """Each {"name", "model_id", "latency_ms", "tokens_in", "tokens_out"}."""
    @property
    def images(self) -> List[Dict[str, Any]]:
        """Each {"name", "original", "resized", "grid_thw", "image_tokens", "compression_ratio"}."""
    @property
    def image_pixels(self) -> int: ...
    @property
    def original_pixels(self) -> int: ...
    @property
    def compression_ratio(self) -> Optional[float]: ...
    @property
    def analysis_tokens(self) -> Dict[str, int]:
        """{"prompt", "generated"}."""
    @property
    def summary_tokens(self) -> Dict[str, int]:
        """{"prompt", "generated"}."""
    @property
    def predicted_peak_bytes(self) -> int: ...
    @property
    def peak_memory_bytes(self) -> int: ...
    @property
    def cutline_bytes(self) -> int: ...
    @property
    def badge(self) -> Badge: ...
    @property
    def health_score(self) -> float: ...
    @property
    def latency_ms(self) -> float: ...

class QueryResult:
    """The result of Runtime.query: the model the router chose, why, and the generation."""

    @property
    def model_id(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def fallback_from(self) -> Optional[str]: ...
    @property
    def trinity_score(self) -> float: ...
    @property
    def task(self) -> str: ...
    @property
    def complexity(self) -> str: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def text(self) -> str: ...
    @property
    def finish_reason(self) -> FinishReason: ...
    @property
    def usage(self) -> Dict[str, int]: ...
    @property
    def run_id(self) -> str: ...
    @property
    def badge(self) -> Badge: ...
    @property
    def result(self) -> GenerateResult: ...

class Runtime:
    """The afo runtime: a memory guard with a cutline, a cache of loaded models, one SSOT record per run."""

    def __init__(
        self,
        cutline: Union[int, str, None] = "8GiB",
        ssot_log: Optional[_Path] = None,
        keep_alive: Optional[float] = None,
        threads: Optional[int] = None,
        replica_id: Optional[str] = None,
        node_id: Optional[str] = None,
        catalog: Optional[_Path] = None,
        kv_cache: Optional[str] = "f16",
    ) -> None:
        """cutline: bytes or "8GiB" (default 8 GiB); keep_alive in seconds; threads before the first run; kv_cache "f32", "f16" (the default), "bf16" or "q8_0"."""
    def generate(
        self,
        model: _Path,
        prompt: Optional[str] = None,
        messages: Optional[Sequence[Dict[str, str]]] = None,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        scheme: Optional[str] = None,
        ignore_eos: bool = False,
    ) -> GenerateResult:
        """Generate from a prompt or messages (not both). Raises RefusedError, ModelError, AfoError, ValueError."""
    def stream(
        self,
        model: _Path,
        prompt: Optional[str] = None,
        messages: Optional[Sequence[Dict[str, str]]] = None,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        scheme: Optional[str] = None,
        ignore_eos: bool = False,
    ) -> Stream:
        """As generate, as an iterator of text deltas; breaking out or close() cancels the run."""
    def chain(
        self,
        vlm: _Path,
        images: Sequence[Union[_Path, bytes]],
        instruction: str = "Describe the image.",
        llm: Optional[_Path] = None,
        *,
        analysis_tokens: int = 128,
        summary_tokens: int = 96,
        summary_prompt: Optional[str] = None,
    ) -> ChainResult:
        """The image-analysis -> summary chain; one SSOT record."""
    def query(
        self,
        text: str,
        max_tokens: Optional[int] = None,
        *,
        temperature: Optional[float] = None,
        seed: Optional[int] = None,
        model: Optional[str] = None,
        images: int = 0,
    ) -> QueryResult:
        """Route text to a model of the catalog, under the cutline."""
    def health(self) -> Dict[str, Any]:
        """{"badge", "health_score", "rss_bytes", "cutline_bytes", "ledger", "loaded_models", "cache_hit_rate"}."""
    def preload(self, model: _Path) -> Dict[str, Any]:
        """Load a model now: {"hit", "acquire_ms"}."""
    def evict(self) -> int:
        """Drop every idle model and prefix-cache block; the number of models dropped."""
    @property
    def cutline_bytes(self) -> int: ...
    @property
    def replica_id(self) -> Optional[str]: ...
    @property
    def node_id(self) -> Optional[str]: ...

def write_tiny_vlm(path: _Path) -> None:
    """Write the tiny seeded test VLM (Qwen3-VL, random weights) into the folder path."""
