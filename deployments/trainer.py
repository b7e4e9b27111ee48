"""Trainer deployment (GPU when present): online LoRA learning jobs that publish new versions.

Jobs for one adapter run one at a time, in submission order (a per-adapter asyncio lock, which
is FIFO); jobs for different adapters may interleave. Each job starts from the adapter's current
version (or fresh LoRA weights for a new adapter), trains against the frozen base, and
publishes through the AdapterStore; a diverged job publishes nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from vlora.adapters.jobs import new_job_id
from vlora.adapters.registry import validate_adapter_name
from vlora.adapters.trainer import LoRATrainer, TrainingDataError, TrainingDivergedError
from vlora.deployments.config import AppConfig
from vlora.deployments.errors import find_api_error
from vlora.deployments.image_fetch import image_load_policy
from vlora.deployments.metrics import TrainerMetrics
from vlora.deployments.openai_api import ApiError
from vlora.deployments.placement import resolve_device_dtype
from vlora.engine.config import LORA_TARGET_MODULES


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(slots=True)
class LearnParams:
    """The learn body; types are strict (a bool is not a number, a string is not a bool)."""

    examples: list[dict]
    steps: int = 20
    learning_rate: float = 1e-3
    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    use_rslora: bool = False

    def check(self, max_rank: int, max_examples: int, max_steps: int) -> None:
        if not isinstance(self.examples, list) or not self.examples:
            raise ApiError(400, "examples must be a non-empty list of {\"messages\": [...]} objects",
                           param="examples")
        if len(self.examples) > max_examples:
            raise ApiError(400, f"at most {max_examples} examples per learn call, got {len(self.examples)}",
                           param="examples")
        if not _is_int(self.steps) or not 0 <= self.steps <= max_steps:
            raise ApiError(400, f"steps must be an integer in [0, {max_steps}], got {self.steps!r}", param="steps")
        if not _is_number(self.learning_rate) or not self.learning_rate > 0:
            raise ApiError(400, f"learning_rate must be a positive number, got {self.learning_rate!r}",
                           param="learning_rate")
        if not _is_int(self.rank) or not 1 <= self.rank <= max_rank:
            raise ApiError(400, f"rank must be an integer in [1, {max_rank}] (the server's max_lora_rank), got "
                                f"{self.rank!r}", param="rank")
        if not _is_number(self.lora_alpha) or not self.lora_alpha > 0:
            raise ApiError(400, f"lora_alpha must be a positive number, got {self.lora_alpha!r}", param="lora_alpha")
        if not isinstance(self.use_rslora, bool):
            raise ApiError(400, f"use_rslora must be true or false, got {self.use_rslora!r}", param="use_rslora")
        modules = self.target_modules
        if (not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules)
                or any(m not in LORA_TARGET_MODULES for m in modules)):
            raise ApiError(400, f"target_modules must be a non-empty list from {list(LORA_TARGET_MODULES)}, got "
                                f"{modules!r}"[:300], param="target_modules")


@dataclass(slots=True)
class Job:
    id: str
    adapter: str
    status: str = "queued"  # queued | running | succeeded | failed
    created: float = field(default_factory=time.time)
    steps: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)
    result: dict | None = None
    error: dict | None = None
    idempotency_key: str | None = None  # its publish's key: a retried publish makes no second version

    def view(self) -> dict:
        d = asdict(self)
        del d["idempotency_key"]
        return d


class Trainer:
    def __init__(self, config: AppConfig, store):
        device, dtype = resolve_device_dtype(config)
        # Learn examples' image URLs take the Preprocessor's path: same fetcher, same address checks.
        # Training needs float32 master weights on CPU; on GPU bf16 activations are fine for LoRA.
        self.trainer = LoRATrainer(config.model_dir, device=device, dtype=getattr(torch, dtype),
                                   image_policy=image_load_policy(config.images))
        self.trainer.max_total_tokens = config.limits.max_learn_tokens
        self.limits = config.limits
        self.store = store
        self.max_rank = config.engine.max_lora_rank
        self.job_ttl_s = config.learn_job_ttl_s
        self.jobs: dict[str, Job] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._gpu = asyncio.Lock()  # one training job on the device at a time
        self.metrics = TrainerMetrics()

    def _count_in_progress(self) -> None:
        self.metrics.in_progress.set(sum(1 for j in self.jobs.values() if j.status in ("queued", "running")))

    def _record_outcome(self, job: Job) -> None:
        m = {"model_name": job.adapter}
        code = "200" if job.status == "succeeded" else str(job.error["status"])
        self.metrics.jobs.inc(1, {**m, "status": job.status, "code": code})
        if job.result is not None:
            self.metrics.loss.set(job.result["loss_before"], {**m, "phase": "before"})
            self.metrics.loss.set(job.result["loss_after"], {**m, "phase": "after"})
            self.metrics.duration.observe(job.result["seconds"], m)
        self._count_in_progress()

    async def submit(self, name: str, params: dict, idempotency_key: str | None = None) -> dict:
        """Queue a learn job; returns its view at once (status 'queued')."""
        job, p = self._new_job(name, params, idempotency_key)
        asyncio.get_running_loop().create_task(self._run(job, p))
        return job.view()

    async def learn(self, name: str, params: dict, idempotency_key: str | None = None) -> dict:
        """Run a learn job to the end and return its final view (raises ApiError on failure)."""
        job, p = self._new_job(name, params, idempotency_key)
        await self._run(job, p)
        if job.status == "failed":
            raise ApiError(job.error["status"], job.error["message"])
        return job.view()

    def _new_job(self, name: str, params: dict, idempotency_key: str | None = None) -> tuple[Job, LearnParams]:
        try:
            validate_adapter_name(name)
        except ValueError as e:
            raise ApiError(400, str(e), param="name") from None
        known = {f for f in LearnParams.__dataclass_fields__}
        unknown = set(params) - known
        if unknown:
            raise ApiError(400, f"unknown learn parameters {sorted(unknown)}; expected {sorted(known)}")
        try:
            p = LearnParams(**params)
        except TypeError as e:
            raise ApiError(400, f"invalid learn request: {e}") from None
        p.check(self.max_rank, self.limits.max_learn_examples, self.limits.max_learn_steps)
        job = Job(id=new_job_id(), adapter=name, steps=p.steps, idempotency_key=idempotency_key or new_job_id())
        self.jobs[job.id] = job
        self._count_in_progress()
        return job, p

    async def _run(self, job: Job, p: LearnParams) -> None:
        async with self._locks[job.adapter]:  # FIFO per adapter
            async with self._gpu:
                job.status = "running"
                try:
                    job.result = await self._train_and_publish(job, p)
                    job.status = "succeeded"
                except ApiError as e:
                    job.status, job.error = "failed", {"status": e.status, "message": e.message}
                except Exception as e:  # noqa: BLE001 - recorded on the job, reported to the client
                    api = find_api_error(e)  # e.g. the store's 409 (changed meanwhile) or 504 (replicas behind)
                    job.status, job.error = "failed", (
                        {"status": api.status, "message": api.message} if api is not None
                        else {"status": 500, "message": f"{type(e).__name__}: {e}"})
                except BaseException:  # cancelled: the job cannot finish
                    job.status, job.error = "failed", {"status": 499, "message": "cancelled"}
                    raise
                finally:
                    self._record_outcome(job)
        await self._keep(job)

    async def _keep(self, job: Job) -> None:
        """A finished job moves to the store (kept learn_job_ttl_s, across restarts of either)."""
        try:
            await self._store(self.store.put_job.remote(job.view()))
            self.jobs.pop(job.id, None)
        except Exception:  # noqa: BLE001 - the job stays readable here until this replica restarts
            pass

    async def _train_and_publish(self, job: Job, p: LearnParams) -> dict:
        init, parent, alpha, rslora = None, None, p.lora_alpha, p.use_rslora
        current = await self._store(self.store.list.remote())
        if job.adapter in current:
            parent = current[job.adapter]["version"]
            ref = (await self._store(self.store.get_weights.remote(job.adapter, parent)))[0]
            init = await self._store(ref)
            alpha, rslora = current[job.adapter]["lora_alpha"], current[job.adapter]["use_rslora"]

        def progress(step: int, loss: float) -> None:
            job.step = step
            job.losses.append(loss)

        try:
            res = await asyncio.to_thread(
                self.trainer.train, p.examples, steps=p.steps, learning_rate=p.learning_rate,
                rank=init.rank if init else p.rank, lora_alpha=alpha, target_modules=p.target_modules,
                use_rslora=rslora, init=init, init_alpha=alpha if init else None, progress=progress)
        except TrainingDivergedError as e:
            raise ApiError(422, f"{e}; nothing was published, version {parent} is still served"
                           if parent else f"{e}; nothing was published") from None
        except (TrainingDataError, ValueError) as e:
            raise ApiError(400, str(e), param="examples") from None
        metrics = {"loss_before": res.loss_before, "loss_after": res.loss_after, "steps": res.steps,
                   "num_examples": res.num_examples, "seconds": res.seconds}
        t0 = time.perf_counter()
        # Compare-and-set: 409 if a load, rollback, learn or delete changed the adapter since `parent`.
        info = await self._store(self.store.publish.remote(job.adapter, res.weights, res.lora_alpha, res.use_rslora,
                                                           "learned", parent, metrics, expect_current=parent,
                                                           idempotency_key=job.idempotency_key))
        self.metrics.publish.observe(time.perf_counter() - t0, {"model_name": job.adapter})
        return {"adapter": job.adapter, "version": info["version"], "parent_version": parent, **metrics,
                "replicas_synced": info["replicas_synced"]}

    async def _store(self, ref):
        """A store call within admin_timeout_s (a 504 on the job instead of a hang)."""
        try:
            return await asyncio.wait_for(ref, self.limits.admin_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the adapter store did not answer within {self.limits.admin_timeout_s:g} s",
                           code="timeout") from None

    async def job(self, name: str, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        view = job.view() if job is not None else await self._store(self.store.get_job.remote(job_id))
        if view is None or view["adapter"] != name:
            raise ApiError(404, f"no job {job_id!r} for adapter {name!r} (finished jobs are kept "
                                f"{self.job_ttl_s:g} s)", code="job_not_found")
        return view

    async def ready(self) -> bool:
        return True
