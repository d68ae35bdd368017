"""COSA data: annotation entries, the released frame sampling, clip transforms, tokenisation, collaters and a
WordPiece vocabulary builder for corpora without the released one (TXH-mercury/COSA ``data/data.py``).

Annotations: a JSON list of entries in the layout of the COSA release,

- caption / retrieval: ``{"video_id": str, "desc" | "caption": str | [str]}``; a list (test files) holds several
  texts of one video;
- QA: ``{"video_id", "question": str | [str], "answer": str | [str] | [[str]], "question_id"?}``; one question
  with an answer string, one question with a list of human answers, or parallel lists of questions and answers
  (each answer a string or a list of human answers).

Frames of ``video_id`` are the image files of ``<frames_root>/<video_id>/`` sorted by name (the release's
``frame_%04d.jpg`` from ffmpeg). :class:`CosaFramesDecoder` lists them without decoding any (a clip of hundreds of
frames is read only at the sampled positions); a missing video directory or an empty one, and a ``video_id`` that
would leave the frames root (absolute, or with a ``..`` component), is a
:class:`~unilm_vl.data.decode.BadSample` naming the path, i.e. a counted, logged skip of the pipeline's one
handler. Image sources (webdataset, TSV) are 1-frame clips, as in the release (``train_utils.py:427``).

Flow of one sample (stages, all picklable)::

    frames record --CosaFramesDecoder--> {frame_paths, captions | qa}   image record --> {image, caption}
                 \\________________________________  _________________________________/
                                                  \\/
         ChooseText (train: a seeded random text / QA pair; eval: the first)
         SampleFrames (segment split; random frame per segment in training, middle frame in test; pad with last)
         ClipTransform (T x 3 x H x W, one crop / flip for the whole clip)
         TokenizeCosa (WordPiece [CLS] ... [SEP], padded to --max-text-tokens; QA: question + answer rows)
         --> CollateCosa

Batch (:class:`CollateCosa`)::

    {"id": [video ids], "nsentences": B, "ntokens": non-pad text tokens,
     "raw_text": [the caption (or question) tokenised in text_ids, as a string],
     "references": [[every text of the video]],                        # eval: caption refs, retrieval grouping
     "net_input": {"frames": B x T x 3 x H x W float (normalised), "text_ids": B x L long, "text_mask": B x L long}}

QA batches add ``net_input["question_ids" | "question_mask"]`` (B x L, the question; ``text_ids`` holds it too),
``net_input["answer_ids" | "answer_mask"]`` (B x A, A = 10 as released) and ``"answers"``: [[all human answers]].
A batch that mixes clip lengths (images with multi-frame clips) repeats the last frame of the shorter clips, the
release's padding rule.

Vocabulary: the release uses ``bert-base-uncased``'s ``vocab.txt``, which cannot be downloaded here; a local copy
works with ``--vocab-file``. For the synthetic world, :mod:`unilm_vl.data.cosa_vocab` writes one.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .decode import BadSample, load_image
from .jsonio import read_json
from .sources import IMAGE_EXTENSIONS, SourceSpec, video_directory

logger = logging.getLogger(__name__)

MAX_ANSWER_TOKENS = 10
"""Answer row length of the release (``pretrain.py:571-621``)."""


# ----------------------------------------------------------------------------------------------- frame sampling
def split_segments(num_items: int, num_segments: int) -> List[List[int]]:
    """The release's ``split`` (``data.py:160-164``) on indices ``0..num_items-1``.

    Fewer items than segments: the list is padded with its last index to ``num_segments``. Then with
    ``k, m = divmod(len, n)`` segment ``i`` is ``items[i*k + min(i, m) : (i+1)*k + min(i+1, m)]`` (the first ``m``
    segments get one extra item). ``split_segments(10, 4) = [[0,1,2],[3,4,5],[6,7],[8,9]]``.
    """
    if num_items <= 0:
        raise ValueError(f"a clip needs at least one frame, got {num_items}")
    if num_segments <= 0:
        raise ValueError(f"num_segments must be positive, got {num_segments}")
    items = list(range(num_items))
    if num_items < num_segments:
        items += [num_items - 1] * (num_segments - num_items)
    k, m = divmod(len(items), num_segments)
    return [items[i * k + min(i, m) : (i + 1) * k + min(i + 1, m)] for i in range(num_segments)]


def sample_frame_indices(
    num_items: int, num_segments: int, train: bool, rng: Optional[random.Random] = None
) -> List[int]:
    """One frame index per segment of :func:`split_segments`: uniform in training (``rng``), the middle one
    ``seg[(len(seg) + 1) // 2 - 1]`` in test. ``(10, 4, test) -> [1, 4, 6, 8]``, ``(3, 8) -> [0,1,2,2,2,2,2,2]``."""
    segments = split_segments(num_items, num_segments)
    if train:
        if rng is None:
            raise ValueError("training-mode frame sampling needs a seeded random.Random")
        return [seg[rng.randrange(len(seg))] for seg in segments]
    return [seg[(len(seg) + 1) // 2 - 1] for seg in segments]


def list_video_frames(frames_root: str, video_id: str, where: str = "?") -> List[str]:
    """Sorted frame files of ``<frames_root>/<video_id>/``; a missing or empty directory, or a ``video_id`` that
    leaves the frames root (absolute, ``..``; :func:`~unilm_vl.data.sources.video_directory`), raises
    :class:`BadSample` naming it."""
    video_dir = video_directory(frames_root, video_id, where)
    if not os.path.isdir(video_dir):
        raise BadSample(f"missing video directory: {video_dir}", video_dir, "video_id")
    paths = sorted(os.path.join(video_dir, f) for f in os.listdir(video_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise BadSample(f"empty frame directory: {video_dir}", video_dir, "video_id")
    return paths


def load_frames(paths: Sequence[str]) -> List[Any]:
    """Decode frame files (repeated paths are decoded once); failures are :class:`BadSample` naming the file."""
    cache: Dict[str, Any] = {}
    for path in paths:
        if path not in cache:
            try:
                cache[path] = load_image(path)
            except FileNotFoundError as exc:
                raise BadSample(str(exc), path, "frames") from None
    return [cache[p] for p in paths]


# ----------------------------------------------------------------------------------------------- transforms
@dataclass
class ClipTransformFn:
    """PIL frames -> ``T x 3 x R x R`` float, one random draw for the whole clip (the release's ``data/data.py``).

    ``none`` (the release's default and all pretraining): ToTensor, ``Resize((R, R))`` (aspect squashed,
    bilinear), Normalize; the same in training and test. ``crop_flip``: training
    ``RandomResizedCrop(R, scale=(0.8, 1), ratio=(1, 1))`` and ``RandomHorizontalFlip``; test ``Resize(R)`` of the
    short side and ``CenterCrop(R)``. Random draws use torch's generator, which the pipeline seeds per sample.
    As in the release, the resizes run on the stacked frame tensor without antialiasing (torchvision's tensor
    default of the release's era), so released checkpoints see the inputs they were trained on.
    """

    size: int
    mean: Tuple[float, ...] = OPENAI_CLIP_MEAN
    std: Tuple[float, ...] = OPENAI_CLIP_STD
    kind: str = "none"
    train: bool = False

    def __post_init__(self):
        if self.kind not in ("none", "crop_flip"):
            raise ValueError(f"unknown video transform {self.kind!r}; choose none or crop_flip")

    def _ops(self):
        from torchvision import transforms as T

        if self.kind == "none":
            return [T.Resize((self.size, self.size), antialias=False)]
        if self.train:
            return [
                T.RandomResizedCrop(self.size, scale=(0.8, 1.0), ratio=(1.0, 1.0), antialias=False),
                T.RandomHorizontalFlip(),
            ]
        return [T.Resize(self.size, antialias=False), T.CenterCrop(self.size)]

    def __call__(self, frames: Sequence[Any], where: str = "?") -> torch.Tensor:
        from torchvision.transforms import functional as TF

        sizes = {f.size for f in frames}
        if len(sizes) != 1:
            raise BadSample(f"frames of one clip differ in size: {sorted(sizes)}", where, "frames")
        clip = torch.stack([TF.to_tensor(f) for f in frames])  # T x 3 x H x W in [0, 1]
        for op in self._ops():
            clip = op(clip)  # one draw for the whole T x 3 x H x W stack
        mean = torch.tensor(self.mean, dtype=clip.dtype)[None, :, None, None]
        std = torch.tensor(self.std, dtype=clip.dtype)[None, :, None, None]
        return (clip - mean) / std  # T x 3 x R x R


# ----------------------------------------------------------------------------------------------- annotations
def _text_list(value: Any, where: str, field: str) -> List[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise BadSample(
            f"{field!r} must be a non-empty string or list of non-empty strings, got {value!r}", where, field
        )
    return [t.strip() for t in texts]


def parse_qa(entry: Dict[str, Any], where: str) -> List[Tuple[str, List[str], Optional[Any]]]:
    """``[(question, [human answers], question_id)]`` of a QA entry (module docstring)."""
    question, answer = entry.get("question"), entry.get("answer")
    if question is None or answer is None:
        raise BadSample("QA entry lacks 'question' or 'answer'", where, "question")
    qid = entry.get("question_id")
    if isinstance(question, str):
        if isinstance(answer, list) and answer and all(isinstance(a, list) for a in answer):
            raise BadSample("one question with a list of answer lists", where, "answer")
        return [(_text_list(question, where, "question")[0], _text_list(answer, where, "answer"), qid)]
    questions = _text_list(question, where, "question")
    if not isinstance(answer, list) or len(answer) != len(questions):
        raise BadSample(
            f"{len(questions)} questions need a list of {len(questions)} answers, got {answer!r}", where, "answer"
        )
    qids = qid if isinstance(qid, list) and len(qid) == len(questions) else [None] * len(questions)
    return [(q, _text_list(a, where, "answer"), i) for q, a, i in zip(questions, answer, qids)]


def parse_entry(entry: Any, where: str) -> Dict[str, Any]:
    """``{"video_id", "captions": [str], "qa": [(question, [answers], qid)]}`` of one annotation entry; at least
    one of ``captions`` / ``qa`` is non-empty. Raises :class:`BadSample` naming the field."""
    if not isinstance(entry, dict) or "video_id" not in entry:
        raise BadSample("entry lacks video_id", where, "video_id")
    if isinstance(entry["video_id"], bool) or not isinstance(entry["video_id"], (str, int)):
        raise BadSample(
            f"video_id must be a string or an integer: got {type(entry['video_id']).__name__}", where, "video_id"
        )
    text = entry.get("desc", entry.get("caption"))
    captions = _text_list(text, where, "desc") if text is not None else []
    qa = parse_qa(entry, where) if ("question" in entry or "answer" in entry) else []
    if not captions and not qa:
        raise BadSample("entry has neither desc/caption nor question/answer", where, "desc")
    return {"video_id": str(entry["video_id"]), "captions": captions, "qa": qa}


@dataclass
class CosaFramesDecoder:
    """Decoder of frames annotation records (``spec.extra["decoder"]``): the parsed entry and the frame paths,
    no pixels. Missing / empty video directories raise :class:`BadSample` naming the directory."""

    def __call__(self, raw: Dict[str, Any], spec: SourceSpec) -> Dict[str, Any]:
        if "__error__" in raw:
            raise BadSample(raw["__error__"], raw["__url__"], "annotation")
        where = f"{raw['__url__']}[{raw['__index__']}]"
        parsed = parse_entry(raw["entry"], where)
        paths = list_video_frames(spec.frames_root, parsed["video_id"], where)
        return {
            "__key__": parsed["video_id"],
            "__source__": spec.name,
            "__where__": where,
            "frame_paths": paths,
            "captions": parsed["captions"],
            "qa": parsed["qa"],
            "meta": {},
        }


def read_annotation(path: str) -> List[Dict[str, Any]]:
    """Parsed entries of an annotation file (evaluation: every entry must be valid; errors name the file and the
    entry)."""
    entries = read_json(path, "annotation")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"annotation file {path} must hold a non-empty JSON list")
    out = []
    for index, entry in enumerate(entries):
        try:
            out.append(parse_entry(entry, f"{path}[{index}]"))
        except BadSample as exc:
            raise ValueError(str(exc)) from None
    return out


# ----------------------------------------------------------------------------------------------- stages
@dataclass
class ChooseText:
    """Pick the text of the sample: ``mode="caption"`` sets ``caption`` (training: a seeded random one of the
    video's texts; eval: the first) and ``references`` (all); ``mode="qa"`` sets ``question``, ``answer``
    (training: one random human answer, as the release's VQAv2 loader) and ``answers`` (all human answers).
    Image samples (``image`` + ``caption``) pass through with ``references = [caption]``."""

    mode: str = "caption"
    train: bool = True

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        rng = random.Random(sample.get("__seed__", 0))
        where = sample.get("__where__", "?")
        if self.mode == "qa":
            qa = sample.get("qa") or []
            if not qa:
                raise BadSample("QA finetuning needs 'question' and 'answer'", where, "question")
            question, answers, qid = qa[rng.randrange(len(qa))] if self.train else qa[0]
            sample.update(
                question=question,
                answers=answers,
                question_id=qid,
                answer=answers[rng.randrange(len(answers))] if self.train else answers[0],
            )
            return sample
        captions = sample.get("captions")
        if captions is None:
            caption = sample.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise BadSample("sample has no caption", where, "caption")
            captions = [caption.strip()]
        if not captions:
            raise BadSample("sample has no desc/caption", where, "desc")
        sample["references"] = list(captions)
        sample["caption"] = captions[rng.randrange(len(captions))] if self.train else captions[0]
        return sample


@dataclass
class SampleFrames:
    """``sample["frames"]`` = the ``num_frames`` frames of :func:`sample_frame_indices` (seeded by the sample's
    ``__seed__``), decoded here so only those files are read. An image is a 1-frame clip whatever ``num_frames``
    is (the release's rule for image datasets)."""

    num_frames: int
    train: bool

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        if "image" in sample:
            sample["frames"] = [sample.pop("image")]
            return sample
        rng = random.Random(sample.get("__seed__", 0))
        if "frame_paths" in sample:
            paths = sample.pop("frame_paths")
            picked = sample_frame_indices(len(paths), self.num_frames, self.train, rng)
            sample["frames"] = load_frames([paths[i] for i in picked])
            sample["frame_indices"] = picked
            return sample
        if "frames" in sample:  # frames already decoded by the stock frames decoder
            frames = sample["frames"]
            picked = sample_frame_indices(len(frames), self.num_frames, self.train, rng)
            sample["frames"] = [frames[i] for i in picked]
            sample["frame_indices"] = picked
            return sample
        raise BadSample("sample has no frames or image", sample.get("__where__", "?"), "frames")


@dataclass
class ClipTransform:
    """``sample["frames"]`` -> ``T x 3 x R x R`` with a :class:`ClipTransformFn`."""

    transform: Callable

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        sample["frames"] = self.transform(sample["frames"], sample.get("__where__", "?"))
        return sample


@dataclass
class TokenizeCosa:
    """WordPiece rows ``[CLS] ... [SEP] [PAD]...`` of fixed length (truncation keeps ``[SEP]`` last, as BERT's
    tokenizer does): ``text`` from ``caption`` (or ``question`` for QA); QA also ``answer_tokens`` of
    ``answer_length`` (10 in the release)."""

    tokenizer: Any
    max_text_tokens: int
    qa: bool = False
    answer_length: int = MAX_ANSWER_TOKENS

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        text = sample["question"] if self.qa else sample["caption"]
        sample["text"] = self.tokenizer.encode_batch([text], self.max_text_tokens)[0]  # L
        if self.qa:
            sample["answer_tokens"] = self.tokenizer.encode_batch([sample["answer"]], self.answer_length)[0]  # A
        return sample


def stack_clips(clips: Sequence[torch.Tensor]) -> torch.Tensor:
    """``B x T x 3 x H x W`` from clips of possibly different lengths: shorter ones repeat their last frame."""
    longest = max(c.shape[0] for c in clips)
    padded = [
        c if c.shape[0] == longest else torch.cat([c, c[-1:].expand(longest - c.shape[0], *c.shape[1:])]) for c in clips
    ]
    return torch.stack(padded)  # B x T x 3 x H x W


@dataclass
class CollateCosa:
    """The COSA batch of the module docstring (``qa=True`` adds the question / answer rows and ``answers``)."""

    pad_id: int = 0
    qa: bool = False

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        frames = stack_clips([s["frames"] for s in samples])  # B x T x 3 x H x W
        text_ids = torch.stack([s["text"] for s in samples])  # B x L
        text_mask = (text_ids != self.pad_id).long()  # B x L
        net_input = {"frames": frames, "text_ids": text_ids, "text_mask": text_mask}
        batch: Dict[str, Any] = {
            "id": [s["__key__"] for s in samples],
            "nsentences": len(samples),
            "ntokens": int(text_mask.sum()),
            "raw_text": [s["question"] if self.qa else s["caption"] for s in samples],
            "references": [list(s.get("references") or [s.get("caption", "")]) for s in samples],
            "net_input": net_input,
        }
        if self.qa:
            answer_ids = torch.stack([s["answer_tokens"] for s in samples])  # B x A
            answer_mask = (answer_ids != self.pad_id).long()  # B x A
            net_input.update(
                question_ids=text_ids, question_mask=text_mask, answer_ids=answer_ids, answer_mask=answer_mask
            )
            batch["answers"] = [list(s["answers"]) for s in samples]
            batch["question_id"] = [s.get("question_id") for s in samples]
            batch["ntokens"] += int(answer_mask.sum())
        return batch


def cosa_stages(
    tokenizer,
    max_text_tokens: int,
    num_frames: int,
    train: bool,
    transform: Callable,
    qa: bool = False,
    answer_length: int = MAX_ANSWER_TOKENS,
) -> list:
    """The stage list of the module docstring."""
    return [
        ChooseText("qa" if qa else "caption", train),
        SampleFrames(num_frames, train),
        ClipTransform(transform),
        TokenizeCosa(tokenizer, max_text_tokens, qa, answer_length),
    ]


# ----------------------------------------------------------------------------------------------- evaluation clips
class EvalClips(torch.utils.data.Dataset):
    """Test-mode clips of a list of video ids (middle frame per segment): ``T x 3 x R x R`` each. An evaluation
    set must be complete: a missing or empty video directory raises ``FileNotFoundError`` naming it."""

    def __init__(self, frames_root: str, video_ids: Sequence[str], num_frames: int, transform: Callable):
        self.frames_root, self.video_ids = frames_root, list(video_ids)
        self.num_frames, self.transform = num_frames, transform

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            paths = list_video_frames(self.frames_root, self.video_ids[index])
            picked = sample_frame_indices(len(paths), self.num_frames, train=False)
            return self.transform(load_frames([paths[i] for i in picked]), paths[0])
        except BadSample as exc:
            raise FileNotFoundError(f"evaluation clip {self.video_ids[index]!r}: {exc}") from None
