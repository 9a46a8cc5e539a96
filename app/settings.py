"""Every setting of the service, read from LYRICS_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_store.registry import BUNDLED_DIR


class Settings(BaseSettings):
    """`Settings()` reads the environment; tests pass values directly."""

    model_config = SettingsConfigDict(env_prefix="LYRICS_", extra="ignore")

    model_dir: Path = Field(BUNDLED_DIR, description="directory of .safetensors checkpoints to serve")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    default_model: str | None = Field(None, description="model used when a request names none "
                                                        "(default: lowest validation perplexity)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line (the "
                                                                     "access log's request_id, path, status... as keys)")
    # Secrets: SecretStr keeps them out of reprs and tracebacks.
    api_keys: SecretStr = Field(SecretStr(""), description="comma-separated API keys; empty: no authentication")
    admin_token: SecretStr | None = Field(None, description="bearer token of POST /admin/reload; unset: no such endpoint")
    state_key: SecretStr | None = Field(None, description="key that signs state handles (HMAC-SHA256); unset: a random "
                                                          "key per process, so handles die with a restart and do "
                                                          "not work across replicas")
    state_ttl_s: float = Field(3600.0, gt=0, description="how long a state handle from /generate stays valid")

    max_prefix_chars: int = Field(2000, ge=1, description="longest prefix accepted by /generate")
    max_new_chars: int = Field(2000, ge=1, description="largest max_chars accepted by /generate")
    max_n: int = Field(8, ge=1, description="most continuations per /generate request")
    max_best_of: int = Field(16, ge=1, le=64, description="most best_of candidates per continuation")
    max_stop: int = Field(8, ge=0, description="most stop strings per request")
    max_stop_chars: int = Field(64, ge=1, description="longest stop string")
    max_texts: int = Field(32, ge=1, description="most texts per /perplexity request")
    max_text_chars: int = Field(100_000, ge=2, description="longest text accepted by /perplexity")
    max_per_char_chars: int = Field(20_000, ge=2, description="most characters over all texts of a /perplexity "
                                                              "request with per_char (each gets a line in the answer)")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body, in bytes (413 above)")
    request_timeout_s: float = Field(60.0, gt=0, description="longest a generation may run, queue time included, "
                                                             "before it is stopped (504, or an error event if streaming)")
    max_batch: int = Field(64, ge=1, description="most sequences one model steps together (one batch per model)")
    max_queue: int = Field(64, ge=0, description="sequences that may wait beyond max_batch before new requests get 503")
    drain_timeout_s: float = Field(30.0, ge=0, description="on shutdown (SIGTERM), how long running requests may "
                                                           "take to finish before they are cancelled; new ones get "
                                                           "503 or a refused connection meanwhile")
    workers: int = Field(2, ge=1, description="threads for /perplexity scoring (generation runs in the batch threads)")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads of each model's scheduler thread "
                                                    "(0: one per usable core)")

    @field_validator("log_level", mode="before")
    @classmethod
    def lower_case_level(cls, value):
        return value.lower() if isinstance(value, str) else value
