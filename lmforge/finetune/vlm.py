"""Training a vision-language model on conversations about images (`task: vlm`).

Data is JSONL, one conversation a line: `{"images": ["a.png", ...], "messages": [...]}` in
OpenAI's chat shape, where a user message's content may be a list of `{"type": "text",
"text": ...}` and `{"type": "image"}` parts (one image part per entry of `images`, in order;
paths relative to the JSONL file). The loss covers the assistant's turns only, exactly as
chat SFT does: each image part becomes the text that stands for the image in the model's
prompts (lmforge's own models: `image_tokens` image tokens; see `lmforge.images`), and its
pixel tiles replace those tokens inside the model.

The model is one of:
- a vision-language preset (`model: vlm-small`, or a mapping with `preset`, `vision`,
  `text`), trained from nothing with a BPE tokenizer trained on the data's text;
- `init_from` a vision-language model (its weights, tokenizer and settings), to go on;
- `init_from` a decoder-only language model: its weights, tokenizer and chat template with a
  fresh projector and a fresh vision encoder, or the encoder of `vision_from` (a
  vision-language model), so a small pretrained language model learns to see.

`freeze: [vision, text]` keeps parts as they are; `lr_scales: {projector: 10}` gives a part
its own learning rate (a fresh projector learns faster than the backbones around it).
`vision_aux: 1.0` adds a second loss in training: each image alone in its conversation names
its answer's tokens straight from its features (`VLM.image_words`), which gives a fresh
encoder a direct signal for what the answers speak of. With `vision_aux_columns: true` it
names them in order, column by column from the left (`VLM.image_columns`, a CTC loss with the
image token as the blank), for images of text: the characters, and where each one is.

`lora_rank > 0` (with a pretrained model: `init_from`) keeps the decoder's weights as they are
and trains LoRA adapters on its linear layers, and on the projector's when `lora_targets`
names them (`proj`, `up`: for a projector that is already trained); the vision encoder and a
projector without adapters train whole unless frozen (`freeze` also stops a part's adapters).
A checkpoint is then a vision-language model directory, the weights the adapters sit on (the
decoder exactly as it started, its vocabulary grown by the image token), with the adapter
files beside them (PEFT's layout, lmforge's layer names): `open_model` puts the adapters on,
`adapter=False` (`--no-adapter`) leaves them off, and `lmforge merge` folds them in. With the
adapters off and no image, a model made from a pretrained decoder answers text as that
decoder did: the engine never samples the image token.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import AddedToken
from torch import nn

from lmforge.chat import (
    IMAGE_PARTS,
    IMAGE_TOKEN,
    image_count,
    template_messages,
    text_of_parts,
    vision_chat_prompt_ids,
)
from lmforge.config import VLMConfig, from_dict, resolve_vlm_config
from lmforge.errors import CheckpointMismatch, ConfigError
from lmforge.finetune.sft import (
    IGNORE,
    ROLES,
    ChatTask,
    encode_pieces,
    template_pieces,
    training_row,
)
from lmforge.finetune.task import (
    ExampleBatches,
    check_resumed_adapter,
    pad_rows,
    read_jsonl,
    split_examples,
)
from lmforge.images import (
    ImageError,
    Prepared,
    expand_images,
    image_processor,
    load_image,
    tiles_of,
)
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.lora import (
    LoraConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from lmforge.modeldir import (
    GENERATION_CONFIG,
    WEIGHTS,
    load_weights,
    read_config,
    save_image_settings,
    save_model,
    stop_token_ids,
)
from lmforge.models.decoder import Decoder
from lmforge.models.vlm import VLM
from lmforge.open import OpenedModel, open_model
from lmforge.tokenizer import Tokenizer, train_bpe
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import Dist
from lmforge.train.task import register_task

PARTS = ("vision", "projector", "text")
# How many held-out conversations the exact-match figure decodes at each evaluation.
EXACT_MATCH_EXAMPLES = 200


def read_image_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Every conversation of a JSONL file, checked: {"line", "messages" (contents a string
    or OpenAI-style parts), "images" (absolute paths), "answer" (the last assistant turn)}.
    A bad line or a missing image names both."""
    path = Path(path)
    out = []
    for number, value in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(value, dict) or not isinstance(value.get("messages"), list):
            raise ConfigError(f"{where}: expected {{\"images\": [...], \"messages\": [...]}}")
        images = value.get("images", [])
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise ConfigError(f"{where}: \"images\" must be a list of file paths")
        messages = [_message(m, i, where) for i, m in enumerate(value["messages"])]
        if image_count(messages) != len(images):
            raise ConfigError(f"{where}: {image_count(messages)} image part(s) in the messages "
                              f"for {len(images)} image(s) in \"images\"")
        files = [(path.parent / i).resolve() for i in images]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{where}: image {missing[0]} not found")
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if not answers:
            raise ConfigError(f"{where}: the conversation has no assistant turn to learn from")
        out.append({"line": number, "messages": messages, "images": files,
                    "answer": answers[-1]})
    return out


def _message(m: Any, i: int, where: str) -> dict[str, Any]:
    """A message, checked: a string content, or (a user's) a list of text and image parts."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ConfigError(f"{where}: message {i} needs a role ({', '.join(ROLES)}) and content")
    content = m.get("content")
    if isinstance(content, str):
        return {"role": m["role"], "content": content}
    if not isinstance(content, list) or m["role"] != "user":
        raise ConfigError(f"{where}: message {i}'s content must be a string (a list of parts "
                          "only in user messages)")
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in IMAGE_PARTS and not (kind == "text" and isinstance(part.get("text"), str)):
            raise ConfigError(f"{where}: message {i} has a part that is neither "
                              "{\"type\": \"text\", \"text\": ...} nor {\"type\": \"image\"}")
    return {"role": m["role"], "content": content}


def rendered(messages: list[dict[str, Any]], placeholder: str) -> list[dict[str, str]]:
    """Messages with string contents, each image part replaced by `placeholder`."""
    return [{"role": m["role"], "content": text_of_parts(m["content"], placeholder)}
            for m in messages]


def with_image_token(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer, with the image token added (at the end of its vocabulary) if missing."""
    if tokenizer.token_id(IMAGE_TOKEN) is None:
        tokenizer.backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True)])
    return tokenizer


class VisionChatTask(ExampleBatches):
    """Next-token loss on the assistant's answers to conversations about images."""

    def __init__(self, cfg: TrainConfig, dist: Dist) -> None:
        if not cfg.data:
            raise ConfigError("no training data: set data=FILE (JSONL of image conversations, "
                              "see examples/vision/make_data.py)")
        unknown = [p for p in cfg.freeze if p not in PARTS]
        if unknown:
            raise ConfigError(f"freeze names {', '.join(map(repr, unknown))}; the parts are "
                              f"{', '.join(PARTS)}")
        self.cfg, self.dist = cfg, dist
        train = read_image_conversations(cfg.data)
        if cfg.val_data:
            val = read_image_conversations(cfg.val_data)
        else:
            train, val = split_examples(train, cfg.val_fraction, cfg.seed)
        self.lora = LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                               cfg.lora_targets) if cfg.lora_rank > 0 else None
        if self.lora is not None and not cfg.init_from:
            raise ConfigError("LoRA adapts a pretrained model and this recipe trains one from "
                              "nothing: set init_from=MODEL, or lora_rank=0")
        opened = open_model(cfg.init_from, "cpu", torch.float32) if cfg.init_from else None
        # A LoRA run's adapters are folded in: training goes on from what the model computes.
        self.base = merge_lora(opened.model) if opened else None
        self.base_dir = opened.directory if opened else None
        self.tokenizer = self._tokenizer(train, opened)
        self.stop_ids = stop_token_ids(opened.directory, self.tokenizer) if opened else tuple(
            i for i in (self.tokenizer.eos_id, self.tokenizer.token_id("<|im_end|>"))
            if i is not None)
        self.model_cfg = self._model_config()
        if cfg.vision_aux_columns and not (cfg.vision_aux and self.model_cfg.projector == "linear"):
            raise ConfigError("vision_aux_columns reads the columns through a linear projector's "
                              "weights, with vision_aux as its weight: set vision_aux > 0 and "
                              f"model.projector: linear (not {self.model_cfg.projector}), or "
                              "remove vision_aux_columns")
        self.context = min(cfg.context_length or self.model_cfg.context_length,
                           self.model_cfg.context_length)
        # An imported model sees images its own way (Idefics3 tiles); a new one, or one of
        # lmforge's, as one square.
        self.processor = opened.processor if isinstance(self.base, VLM) else \
            image_processor(self.model_cfg, self.tokenizer)
        self.pad_id = next((i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id)
                            if i is not None), 0)
        self.skipped = 0
        self.examples = self._rows(train)
        self.val_examples = self._rows(val)
        self.val_conversations = val
        if not self.examples:
            raise ConfigError(f"{cfg.data} gave no training example that fits the context "
                              f"of {self.context} tokens")
        if cfg.epochs > 0:
            per_step = cfg.batch_size * cfg.grad_accum * dist.world
            cfg.max_steps = max(1, math.ceil(cfg.epochs * len(self.examples) / per_step))

    # Setting up -------------------------------------------------------------------------

    def _tokenizer(self, train: list[dict[str, Any]], opened: OpenedModel | None) -> Tokenizer:
        if opened is not None:
            if opened.tokenizer is None:
                raise FileNotFoundError(f"{self.cfg.init_from} has no tokenizer.json")
            if isinstance(opened.model, VLM):  # it has an image token of its own
                return opened.tokenizer
            return with_image_token(opened.tokenizer)
        texts = [text_of_parts(m["content"], "") for c in train for m in c["messages"]]
        return with_image_token(train_bpe(texts, vocab_size=self.cfg.vocab_size))

    def _model_config(self) -> VLMConfig:
        if isinstance(self.base, VLM):
            return self.base.cfg
        image_id = self.tokenizer.token_id(IMAGE_TOKEN)
        cfg = resolve_vlm_config(self.cfg.vlm_model())
        text = cfg.text.to_dict() if self.base is None else self.base.cfg.to_dict()
        values = {**cfg.to_dict(), "text": {**text, "vocab_size": self.tokenizer.vocab_size},
                  "image_token_id": image_id}
        values.pop("family")
        return from_dict(VLMConfig, values, where="model")

    def _rows(self, conversations: list[dict[str, Any]]) -> list[tuple[list[int], list[int],
                                                                        list[Path]]]:
        rows = []
        for c in conversations:
            pieces = template_pieces(self.tokenizer,
                                     template_messages(c["messages"], self.processor))
            texts = [image.text for image in map(self.prepared, c["images"])]
            ids, scored = encode_pieces(self.tokenizer,
                                        _expanded(pieces, self.processor.image_token, texts))
            if len(ids) > self.context + 1:
                self.skipped += 1
                continue
            x, y = training_row(ids, scored)
            rows.append((x, y, c["images"]))
        return rows

    def build_model(self, device: torch.device) -> nn.Module:
        model = VLM(self.model_cfg)
        if isinstance(self.base, VLM):
            model.load_state_dict(self.base.state_dict())
        elif isinstance(self.base, Decoder):
            _copy_decoder(self.base, model.text)
        if self.cfg.vision_from:
            source = open_model(self.cfg.vision_from, "cpu", torch.float32).model
            if not isinstance(source, VLM):
                raise CheckpointMismatch(f"vision_from={self.cfg.vision_from} is not a "
                                         "vision-language model")
            theirs, ours = asdict(source.cfg.vision), asdict(self.model_cfg.vision)
            differ = [f"{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ours
                      if theirs[k] != ours[k]]
            if differ:
                raise CheckpointMismatch(f"vision_from={self.cfg.vision_from} has other vision "
                                         f"settings ({'; '.join(differ)}): set model.vision to "
                                         "match it")
            model.vision.load_state_dict(source.vision.state_dict())
        model.tie_weights()
        if self.lora is not None:
            apply_lora(model, self.lora)
            for part in ("vision", "projector"):  # no adapters there: trained whole
                if not lora_layers(getattr(model, part)):
                    getattr(model, part).requires_grad_(True)
        for part in self.cfg.freeze:
            getattr(model, part).requires_grad_(False)
        return model.to(device)

    # Batches ----------------------------------------------------------------------------

    def prepared(self, path: Path) -> Prepared:
        try:
            image = load_image(path)
        except ImageError as err:
            raise ImageError(f"{path}: {err}") from None
        return self.processor.prepare(image)

    def collate(self, rows) -> tuple[torch.Tensor, ...]:
        lengths = torch.tensor([len(x) for x, _, _ in rows])
        size = self.model_cfg.vision.image_size
        pixels = torch.cat([torch.zeros(0, 3, size, size)]
                           + [self.prepared(p).pixels for _, _, paths in rows for p in paths])
        return (pad_rows([x for x, _, _ in rows], self.pad_id),
                pad_rows([y for _, y, _ in rows], IGNORE), lengths, pixels,
                self.named_tokens(rows, len(pixels)))

    def named_tokens(self, rows, images: int) -> torch.Tensor:
        """For `vision_aux`: per image, its answer's tokens in order, padded with -1; none
        for an image that shares its conversation with others (a question about two images
        answers neither alone) or with no `vision_aux`."""
        named = [[] for _ in range(images)]
        at = 0
        for _, y, paths in rows:
            if self.cfg.vision_aux and len(paths) == 1:
                named[at] = [t for t in y if t != IGNORE and t not in self.stop_ids]
            at += len(paths)
        return pad_rows(named, -1) if images else torch.zeros(0, 0, dtype=torch.long)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y, _, pixels, named = batch
        scored = y != IGNORE
        images = pixels if len(pixels) else None
        alone = (named >= 0).any(-1)  # the images that `vision_aux` scores
        if not (model.training and images is not None and alone.any()):
            return F.cross_entropy(model(x, select=scored, images=images).float(), y[scored])
        mode = "columns" if self.cfg.vision_aux_columns else "pooled"
        logits, words = model(x, select=scored, images=images, image_words=mode)
        named, words = named[alone], words[alone].float()
        naming = column_naming(words, named, self.model_cfg.image_token_id) \
            if self.cfg.vision_aux_columns else pooled_naming(words, named)
        return F.cross_entropy(logits.float(), y[scored]) + self.cfg.vision_aux * naming

    count = staticmethod(ChatTask.count)
    tokens = staticmethod(ChatTask.tokens)

    # Figures, samples, checkpoints -------------------------------------------------------

    def answers(self, model: nn.Module, conversations: list[dict[str, Any]],
                max_new_tokens: int = 16) -> list[str]:
        """The model's greedy answers to each conversation's last question."""
        requests = []
        for c in conversations:
            messages = c["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            images = [self.prepared(p) for p in c["images"]]
            prompt = vision_chat_prompt_ids(self.tokenizer, self.processor, messages[:last],
                                            images)
            requests.append(Request(prompt, max_new_tokens, SamplingConfig(temperature=0),
                                    stop_ids=self.stop_ids, images=tiles_of(images)))
        engine = Engine(model, self.tokenizer, max_batch=16,
                        max_len=min(self.model_cfg.context_length, self.context + max_new_tokens))
        return [done.text.strip() for done in engine.run(requests)]

    @torch.no_grad()
    def val_metrics(self, model: nn.Module, val_loss: float, step: int) -> dict[str, float]:
        """Exact match of the greedy answers to held-out questions (its first
        EXACT_MATCH_EXAMPLES conversations); none at step 0, where it is chance."""
        shown = self.val_conversations[:EXACT_MATCH_EXAMPLES]
        if step == 0 or not shown:
            return {}
        was_training = model.training
        said = self.answers(model.eval(), shown)
        model.train(was_training)
        return {"val_exact": sum(a == c["answer"] for a, c in zip(said, shown)) / len(shown)}

    @torch.no_grad()
    def sample(self, model: nn.Module) -> str | None:
        if not self.val_conversations:
            return None
        first = self.val_conversations[0]
        answer = self.answers(model.eval(), [first])[0]
        question = rendered(first["messages"], "[image]")[-2]["content"]
        return f"{question}\n>>> {answer}   (expected: {first['answer']})"

    def save(self, directory: Path, model: nn.Module) -> None:
        """A model directory; with LoRA, the weights under the adapters and the adapter files
        (whose base is this directory: see the module docstring)."""
        save_model(directory, model, self.tokenizer)
        save_image_settings(directory, self.processor)
        if self.lora is not None:
            save_adapter(directory, model, self.lora, base=".")
        if self.base_dir is not None and (self.base_dir / GENERATION_CONFIG).is_file():
            shutil.copyfile(self.base_dir / GENERATION_CONFIG, directory / GENERATION_CONFIG)

    def load(self, directory: Path, model: nn.Module) -> None:
        if read_config(directory) != self.model_cfg:
            raise CheckpointMismatch(f"{directory} holds another model than this recipe's: "
                                     "resume with the run's own recipe")
        check_resumed_adapter(directory, self.lora)
        load_weights(model, directory / WEIGHTS)
        if self.lora is not None:
            load_adapter(model, directory)

    def describe(self) -> dict[str, Any]:
        return {"examples": len(self.examples), "val_examples": len(self.val_examples),
                "skipped_too_long": self.skipped, "image_tokens": self.model_cfg.image_tokens}


def pooled_naming(words: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `image_words` logits (N, vocab) against each image's answer tokens
    (`named`, N x longest, padded with -1) taken as a bag, each distinct token equally likely."""
    target = torch.zeros_like(words).scatter_(1, named.clamp(min=0), (named >= 0).to(words.dtype))
    target = target / target.sum(-1, keepdim=True)
    return -(target * F.log_softmax(words, -1)).sum(-1).mean()


def column_naming(columns: torch.Tensor, named: torch.Tensor, blank: int) -> torch.Tensor:
    """CTC loss of `image_columns` logits (N, columns, vocab) against each image's answer
    tokens in order (`named`, padded with -1), `blank` (the image token) between them. An
    answer longer than the columns can hold counts for nothing (zero_infinity)."""
    steps = F.log_softmax(columns, -1).transpose(0, 1)  # (columns, N, vocab), as ctc_loss reads
    lengths = (named >= 0).sum(-1)
    return F.ctc_loss(steps, named.clamp(min=0), torch.full_like(lengths, len(steps)), lengths,
                      blank=blank, zero_infinity=True)


def _expanded(pieces: list[tuple[str, bool]], image_token: str, texts: list[str]
              ) -> list[tuple[str, bool]]:
    """Template pieces with their image tokens replaced by the images' texts, in order."""
    out, used = [], 0
    for text, scored in pieces:
        count = text.count(image_token)
        out.append((expand_images(text, image_token, texts[used:used + count]), scored))
        used += count
    return out


def _copy_decoder(source: Decoder, target: Decoder) -> None:
    """A pretrained decoder's weights into a VLM's, whose vocabulary has the image token
    added: the new embedding rows (and output rows, when untied) start at the mean row."""
    state = source.state_dict()
    for name in ("embed.weight", "lm_head.weight"):
        if name in state and state[name].shape[0] < target.cfg.vocab_size:
            old = state[name]
            grown = old.mean(0, keepdim=True).expand(target.cfg.vocab_size - old.shape[0], -1)
            state[name] = torch.cat([old, grown])
    target.load_state_dict(state)


register_task("vlm", VisionChatTask)
