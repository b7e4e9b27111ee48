"""Online LoRA training against a frozen Qwen2.5-VL base, one job at a time.

`LoRATrainer` loads the HF model once (frozen, eval mode). Each `train` call is a job:

1. Every example (OpenAI chat messages, images as `image_url` parts) is rendered with the same
   `PromptBuilder` the server uses, so training and serving see identical token ids and M-RoPE
   positions. The loss covers the assistant turns only: each turn's content plus the
   `<|im_end|>` that closes it. The spans are found by rendering prefixes (the conversation up
   to the turn with the generation prompt, then including the turn) and checking that each
   render is a token prefix of the next.
2. Images go through the project's `ImageTransform` (bit-exact with HF's processor) and HF's
   own vision tower, once per job: the tower is frozen and not adapted, so its output cannot
   change during the job. Each step then runs only the language model (with PEFT LoRA layers)
   on the precomputed input embeddings, in padded micro-batches whose gradients add up to the
   full-batch gradient.
3. AdamW for `steps` steps. The objective is the mean over examples of each example's mean
   token cross-entropy (HF's causal shift: the logit at position t predicts token t+1).
4. The LoRA layers are always removed afterwards (`unload()`, no merge), even when the job
   fails, so the base weights are bit-identical for the next job.

No Ray import: the Trainer deployment wraps this module.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlora.adapters.peft_io import peft_target_regex
from vlora.engine.config import LORA_TARGET_MODULES
from vlora.engine.images import DEFAULT_LOAD_POLICY, ImageError, ImageLoadPolicy, ImageTransform, load_image
from vlora.engine.lora import LoRAWeights
from vlora.engine.prompts import PromptBuilder, PromptError

IGNORE_INDEX = -100
_MODULE_PARENT = {m: ("self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp")
                  for m in LORA_TARGET_MODULES}


class TrainingDataError(ValueError):
    """The training examples cannot be used as given; the message names the example and what to fix."""


class TrainingDivergedError(ValueError):
    """The loss or the gradient became non-finite; no weights are returned."""


@dataclass(slots=True)
class TrainResult:
    weights: LoRAWeights  # A [r, in], B [out, r], float32 CPU; scaling = PEFT's
    lora_alpha: float
    use_rslora: bool
    loss_before: float  # objective before the first update
    loss_after: float  # objective after the last update (equal to loss_before when steps == 0)
    losses: list[float]  # objective at each step, before that step's update
    steps: int
    num_examples: int
    num_target_tokens: int
    seconds: float


@dataclass(slots=True)
class TrainingExample:
    """One tokenized example: ids with image pads expanded, labels (-100 outside assistant turns)."""

    token_ids: list[int]
    labels: list[int]
    positions: torch.Tensor  # LongTensor [3, L] M-RoPE positions (as the server computes them)
    pixel_values: torch.Tensor | None = None  # float32 [sum(t*h*w), patch_dim] for all images, in order
    image_grids: list[tuple[int, int, int]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each assistant turn's targets

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass(slots=True)
class _Prepared:
    """An example ready for the language model: embeddings already hold the image features."""

    embeds: torch.Tensor  # [L, hidden] on the device, model dtype
    positions: torch.Tensor  # [3, L] long on the device
    targets: torch.Tensor  # [L] long on the device: the token each position must predict, -100 if none


class LoRATrainer:
    """Trains LoRA adapters for one frozen base checkpoint; call `train` once per job."""

    # Micro-batch budget (padded tokens) for one forward/backward; gradients are accumulated
    # across micro-batches, so the update is the same as one full batch.
    max_batch_tokens: int = 8192
    max_grad_norm: float = 1.0  # gradient clipping (the norm is checked for finiteness first)
    weight_decay: float = 0.0
    max_total_tokens: int | None = None  # tokens of all examples of one call together (None: no limit)

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 image_policy: ImageLoadPolicy | None = None):
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.model_dir = str(model_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self.image_policy = image_policy or DEFAULT_LOAD_POLICY
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model_dir, dtype=dtype)
        model.to(self.device).eval()
        model.requires_grad_(False)
        self.model = model
        self.builder = PromptBuilder.from_pretrained(self.model_dir)
        self.transform = ImageTransform.from_pretrained(self.model_dir)
        self.tokenizer = self.builder.tokenizer
        text_cfg = getattr(model.config, "text_config", model.config)
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.max_positions = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)
        self.im_end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if not isinstance(self.im_end_id, int) or self.im_end_id < 0:
            raise ValueError(f"the tokenizer of {model_dir} has no <|im_end|> token; is it a Qwen2.5-VL checkpoint?")
        self._lock = threading.Lock()  # one job at a time: jobs share the base model

    # ---- data -----------------------------------------------------------------------------

    def tokenize_example(self, example: dict, index: int = 0) -> TrainingExample:
        """Render one `{"messages": [...], "tools": [...]?}` example; raises TrainingDataError naming `index`.

        Assistant turns are the targets, tool calls included (their `<tool_call>` text is part of the
        turn); `tool` results and everything else are context."""
        where = f"example {index}"
        if not isinstance(example, dict) or not isinstance(example.get("messages"), list):
            raise TrainingDataError(f"{where} must be an object with a 'messages' list (OpenAI chat format)")
        messages = example["messages"]
        if not messages:
            raise TrainingDataError(f"{where}: 'messages' is empty")
        try:
            self.builder.image_urls(messages)  # validates roles, contents and parts
        except PromptError as e:
            raise TrainingDataError(f"{where}: {e}") from None
        roles = [m.get("role") for m in messages]
        if "assistant" not in roles:
            raise TrainingDataError(
                f"{where} has no assistant message: the loss is computed on assistant turns, so add the answer "
                "the model should learn as a {'role': 'assistant', 'content': ...} message")
        if roles[0] == "assistant":
            raise TrainingDataError(f"{where}: messages[0] is an assistant turn; it must follow a system or user message")

        # Images, in prompt order, each with where it came from for error messages.
        pixels: list[torch.Tensor] = []
        grids: list[tuple[int, int, int]] = []
        images_before: list[int] = []  # images in messages[:i]
        for i, message in enumerate(messages):
            images_before.append(len(grids))
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                if part.get("type") != "image_url":
                    continue
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                try:
                    processed = self.transform(load_image(url, self.image_policy))
                except ImageError as e:
                    raise TrainingDataError(f"{where}: messages[{i}].content[{j}] image: {e}") from None
                pixels.append(processed.pixel_values)
                grids.append(processed.grid_thw)

        tools = example.get("tools") or None  # OpenAI function tools, rendered as at serving time
        try:
            full = self.builder.build_chat(messages, grids, add_generation_prompt=False, tools=tools)
            ids = full.token_ids
            labels = [IGNORE_INDEX] * len(ids)
            spans = []
            for i, role in enumerate(roles):
                if role != "assistant":
                    continue
                n_img = images_before[i]
                head = self.builder.build_chat(messages[:i], grids[:n_img], True, tools).token_ids
                turn = self.builder.build_chat(messages[: i + 1], grids[:n_img], False, tools).token_ids
                if turn[: len(head)] != head or ids[: len(turn)] != turn:
                    raise TrainingDataError(
                        f"{where}: messages[{i}] (assistant) does not tokenize the same alone as in the conversation "
                        "(the chat template or the tokenizer merges it with its neighbours); "
                        "strip leading/trailing whitespace from the message contents")
                ends = [k for k in range(len(turn) - 1, len(head) - 1, -1) if turn[k] == self.im_end_id]
                if not ends:
                    raise TrainingDataError(f"{where}: messages[{i}] (assistant) is not closed by <|im_end|> "
                                            "in the chat template's rendering")
                start, end = len(head), ends[0] + 1
                labels[start:end] = ids[start:end]
                spans.append((start, end))
        except PromptError as e:
            raise TrainingDataError(f"{where}: {e}") from None
        if self.max_positions and len(ids) > self.max_positions:
            raise TrainingDataError(
                f"{where} is {len(ids)} tokens long, above the model's {self.max_positions} positions; shorten it")
        return TrainingExample(
            token_ids=list(ids), labels=labels, positions=full.positions,
            pixel_values=torch.cat(pixels) if pixels else None, image_grids=grids, spans=spans,
        )

    def tokenize(self, examples: list[dict]) -> list[TrainingExample]:
        if not isinstance(examples, list) or not examples:
            raise TrainingDataError("examples must be a non-empty list of {'messages': [...]} objects")
        return [self.tokenize_example(ex, i) for i, ex in enumerate(examples)]

    @torch.no_grad()
    def _prepare(self, ex: TrainingExample) -> _Prepared:
        """Input embeddings (image features scattered in) and next-token targets, on the device."""
        inner = self.model.model
        ids = torch.tensor(ex.token_ids, dtype=torch.long, device=self.device)
        embeds = inner.get_input_embeddings()(ids)
        if ex.pixel_values is not None:
            grid_thw = torch.tensor([list(g) for g in ex.image_grids], dtype=torch.long, device=self.device)
            out = inner.visual(ex.pixel_values.to(self.device, self.dtype), grid_thw=grid_thw)
            feats = getattr(out, "pooler_output", out)
            if isinstance(feats, (list, tuple)):
                feats = torch.cat(list(feats))
            mask = ids == self.model.config.image_token_id
            if int(mask.sum()) != feats.shape[0]:
                raise TrainingDataError(
                    f"the vision tower returned {feats.shape[0]} image embeddings for {int(mask.sum())} image tokens")
            embeds = embeds.clone()
            embeds[mask] = feats.to(embeds.dtype)
        labels = torch.tensor(ex.labels, dtype=torch.long, device=self.device)
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:-1] = labels[1:]  # causal shift: position t predicts token t+1
        return _Prepared(embeds=embeds, positions=ex.positions.to(self.device), targets=targets)

    def _micro_batches(self, prepared: list[_Prepared]) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i, p in enumerate(prepared):
            n = p.embeds.shape[0]
            if current and max(longest, n) * (len(current) + 1) > self.max_batch_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, n)
        if current:
            batches.append(current)
        return batches

    def _batch_loss_sum(self, batch: list[_Prepared]) -> torch.Tensor:
        """Sum over the batch's examples of each example's mean target cross-entropy."""
        length = max(p.embeds.shape[0] for p in batch)
        hidden = batch[0].embeds.shape[1]
        b = len(batch)
        embeds = batch[0].embeds.new_zeros(b, length, hidden)
        positions = torch.zeros(3, b, length, dtype=torch.long, device=self.device)
        targets = torch.full((b, length), IGNORE_INDEX, dtype=torch.long, device=self.device)
        attention = torch.zeros(b, length, dtype=torch.long, device=self.device)
        for k, p in enumerate(batch):
            n = p.embeds.shape[0]
            embeds[k, :n] = p.embeds
            positions[:, k, :n] = p.positions
            targets[k, :n] = p.targets
            attention[k, :n] = 1
        out = self.model.model(inputs_embeds=embeds, position_ids=positions, attention_mask=attention, use_cache=False)
        h = out.last_hidden_state
        rows, cols = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
        logits = self.model.lm_head(h[rows, cols]).float()  # only where a target exists
        token_loss = torch.nn.functional.cross_entropy(logits, targets[rows, cols], reduction="none")
        per_example = torch.zeros(b, dtype=torch.float32, device=self.device).index_add(0, rows, token_loss)
        counts = torch.bincount(rows, minlength=b).clamp(min=1).to(per_example.dtype)
        return (per_example / counts).sum()

    def _objective(self, prepared: list[_Prepared], batches: list[list[int]], backward: bool) -> float:
        """Mean over examples of the per-example loss; with `backward`, accumulates its gradient."""
        n = len(prepared)
        total = 0.0
        for idx in batches:
            if backward:
                loss = self._batch_loss_sum([prepared[i] for i in idx]) / n
                loss.backward()
            else:
                with torch.no_grad():
                    loss = self._batch_loss_sum([prepared[i] for i in idx]) / n
            total += float(loss.detach())
        return total

    # ---- training -------------------------------------------------------------------------

    def train(self, examples: list[dict], steps: int = 20, learning_rate: float = 1e-3, rank: int = 8,
              lora_alpha: float = 16, target_modules: list[str] | None = None, use_rslora: bool = False,
              init: LoRAWeights | None = None, init_alpha: float | None = None,
              progress: Callable[[int, float], None] | None = None) -> TrainResult:
        """Train one adapter on `examples` and return its weights; the base model is left unchanged.

        With `init`, training continues from those weights: its rank is used (`rank` is ignored),
        its alpha is `init_alpha` or else derived from `init.scaling`, and the target modules
        default to the ones it has. `progress(step, loss)` is called after each step (1-based)
        with the objective measured in that step, before its update; an exception it raises
        aborts the job.
        """
        t0 = time.perf_counter()
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive finite number, got {learning_rate!r}")
        rank, lora_alpha, modules = self._adapter_shape(rank, lora_alpha, target_modules, use_rslora, init, init_alpha)
        data = self.tokenize(examples)
        total = sum(len(ex.token_ids) for ex in data)
        if self.max_total_tokens is not None and total > self.max_total_tokens:
            raise TrainingDataError(f"the examples are {total} tokens together, above the limit of "
                                    f"{self.max_total_tokens} per learn call; send fewer or shorter examples")
        num_target_tokens = sum(ex.num_target_tokens for ex in data)

        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=lora_alpha, use_rslora=use_rslora, lora_dropout=0.0, bias="none",
                            target_modules=peft_target_regex(modules))
        with self._lock, torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # LoRA A init (PEFT creates it on the CPU): the same data gives the same adapter
            prepared = [self._prepare(ex) for ex in data]
            batches = self._micro_batches(prepared)
            peft_model = None
            hooks: list = []
            try:
                with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5
                    warnings.simplefilter("ignore", FutureWarning)
                    peft_model = get_peft_model(self.model, config)
                hooks = self._watch_activations()
                layers = self._lora_layers(peft_model, modules)
                if init is not None:
                    self._load_init(layers, init)
                params = [p for lay in layers.values() for p in (lay.lora_A["default"].weight,
                                                                 lay.lora_B["default"].weight)]
                optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=self.weight_decay)
                losses: list[float] = []
                for step in range(1, steps + 1):
                    optimizer.zero_grad(set_to_none=True)
                    loss = self._objective(prepared, batches, backward=True)
                    self._check_finite(loss, f"at step {step} of {steps}", learning_rate)
                    norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                    if not bool(torch.isfinite(norm)):
                        raise TrainingDivergedError(
                            f"the gradient norm became {float(norm)} at step {step} of {steps} "
                            f"(learning rate {learning_rate:g}); try a lower learning rate")
                    optimizer.step()
                    losses.append(loss)
                    if progress is not None:
                        progress(step, loss)
                loss_after = self._objective(prepared, batches, backward=False)
                self._check_finite(loss_after, f"after the last step ({steps})", learning_rate)
                loss_before = losses[0] if losses else loss_after
                weights = self._extract(layers, rank)
            finally:
                for hook in hooks:
                    hook.remove()
                if peft_model is not None:
                    peft_model.unload()  # removes the LoRA layers, no merge: the base weights are untouched
                self.model.requires_grad_(False)
                self.model.eval()
        return TrainResult(weights=weights, lora_alpha=float(lora_alpha), use_rslora=use_rslora,
                           loss_before=loss_before, loss_after=loss_after, losses=losses, steps=steps,
                           num_examples=len(data), num_target_tokens=num_target_tokens,
                           seconds=time.perf_counter() - t0)

    # ---- helpers --------------------------------------------------------------------------

    def _watch_activations(self) -> list:
        """Flag activations that overflow at any RMSNorm of the language model.

        A too-large learning rate can blow the residual stream up past float range without a
        non-finite loss: RMSNorm's mean of squares overflows to inf, the normalized output
        becomes 0, the logits uniform (loss = log(vocab)) and the gradient exactly 0. Checking
        each norm's input catches it at the step it happens.
        """
        self._overflowed = False

        def check(module, args):
            if not self._overflowed:
                with torch.no_grad():
                    if not bool(torch.isfinite(args[0].float().square().mean(-1)).all()):
                        self._overflowed = True

        return [m.register_forward_pre_hook(check) for m in self.model.model.language_model.modules()
                if type(m).__name__.endswith("RMSNorm")]

    def _check_finite(self, loss: float, when: str, learning_rate: float) -> None:
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"the training loss became {loss} {when} (learning rate "
                                        f"{learning_rate:g}); try a lower learning rate")
        if self._overflowed:
            raise TrainingDivergedError(f"the model's activations overflowed (became non-finite) {when} "
                                        f"(learning rate {learning_rate:g}); try a lower learning rate")


    def _adapter_shape(self, rank, lora_alpha, target_modules, use_rslora, init, init_alpha):
        if target_modules is not None:
            target_modules = list(target_modules)
            bad = sorted(set(target_modules) - set(LORA_TARGET_MODULES))
            if bad or not target_modules:
                raise ValueError(f"target_modules {bad or target_modules} not supported; "
                                 f"choose from {', '.join(LORA_TARGET_MODULES)}")
        if init is None:
            if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
                raise ValueError(f"rank must be a positive integer, got {rank!r}")
            if not (isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha) and lora_alpha > 0):
                raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
            modules = target_modules or list(LORA_TARGET_MODULES)
            return rank, float(lora_alpha), [m for m in LORA_TARGET_MODULES if m in modules]
        # continue an existing adapter: its rank, its alpha, its modules
        if not init.weights:
            raise ValueError("init has no LoRA weights")
        init_modules = {mod for _, mod in init.weights}
        unknown = sorted(init_modules - set(LORA_TARGET_MODULES))
        if unknown:
            raise ValueError(f"init has weights for {unknown}, which cannot be trained")
        layers_out = sorted({layer for layer, _ in init.weights if not 0 <= layer < self.num_layers})
        if layers_out:
            raise ValueError(f"init has weights for layers {layers_out}; the base model has {self.num_layers} layers")
        if target_modules is not None and not init_modules <= set(target_modules):
            raise ValueError(f"init adapts {sorted(init_modules)}, not all of which are in target_modules "
                             f"{target_modules}")
        modules = target_modules or sorted(init_modules)
        r = int(init.rank)
        if init_alpha is None:
            alpha = init.scaling * (math.sqrt(r) if use_rslora else r)
        else:
            alpha = float(init_alpha)
            expected = LoRAWeights.scaling_for(r, alpha, use_rslora)
            if not math.isclose(expected, init.scaling, rel_tol=1e-6):
                raise ValueError(f"init_alpha={init_alpha} with rank {r} (use_rslora={use_rslora}) gives scaling "
                                 f"{expected}, but init.scaling is {init.scaling}")
        return r, alpha, [m for m in LORA_TARGET_MODULES if m in modules]

    def _lora_layers(self, peft_model, modules: list[str]) -> dict[tuple[int, str], torch.nn.Module]:
        """(layer, module) -> PEFT LoRA layer, for every language-model projection; checks nothing else got one."""
        from peft.tuners.lora import LoraLayer

        layers = self.model.model.language_model.layers
        found: dict[tuple[int, str], torch.nn.Module] = {}
        for i, layer in enumerate(layers):
            for mod in modules:
                m = getattr(getattr(layer, _MODULE_PARENT[mod]), mod)
                if not isinstance(m, LoraLayer):
                    raise RuntimeError(f"PEFT did not adapt layer {i} {mod}")
                found[(i, mod)] = m
        total = sum(1 for m in peft_model.modules() if isinstance(m, LoraLayer))
        if total != len(found):
            raise RuntimeError(f"PEFT adapted {total} modules, expected {len(found)} language-model projections")
        return found

    @torch.no_grad()
    def _load_init(self, layers: dict[tuple[int, str], torch.nn.Module], init: LoRAWeights) -> None:
        for key, (a, b) in init.weights.items():
            lay = layers[key]
            wa, wb = lay.lora_A["default"].weight, lay.lora_B["default"].weight
            if tuple(a.shape) != tuple(wa.shape) or tuple(b.shape) != tuple(wb.shape):
                raise ValueError(f"init weights for layer {key[0]} {key[1]} have shapes A{tuple(a.shape)} "
                                 f"B{tuple(b.shape)}; the base model needs A{tuple(wa.shape)} B{tuple(wb.shape)}")
            scaling = float(lay.scaling["default"])
            if not math.isclose(scaling, init.scaling, rel_tol=1e-6):
                raise RuntimeError(f"PEFT scaling {scaling} differs from init.scaling {init.scaling}")
            wa.copy_(a)
            wb.copy_(b)
        # Modules the init lacks start as a no-op (B = 0), so the job starts from init's function.
        for key, lay in layers.items():
            if key not in init.weights:
                lay.lora_B["default"].weight.zero_()

    @staticmethod
    def _extract(layers: dict[tuple[int, str], torch.nn.Module], rank: int) -> LoRAWeights:
        weights = {}
        scalings = set()
        for key, lay in layers.items():
            a = lay.lora_A["default"].weight.detach().to("cpu", torch.float32).clone()
            b = lay.lora_B["default"].weight.detach().to("cpu", torch.float32).clone()
            weights[key] = (a, b)
            scalings.add(float(lay.scaling["default"]))
        if len(scalings) != 1:
            raise RuntimeError(f"LoRA layers have different scalings {sorted(scalings)}")
        return LoRAWeights(rank=rank, scaling=scalings.pop(), weights=weights)
