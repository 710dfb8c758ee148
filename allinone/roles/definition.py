"""Role definitions: the schema of a role file, its validation, and where roles are found.

Why roles are data: a role is a prompt and a set of labels, not code. Kept as JSON, a role can be
added (or a built-in one replaced) by dropping a file into $ALLINONE_HOME/roles/, sent inline with
an HTTP request, and reviewed like any other text; the program that builds prompts, trains heads
and writes replies stays one piece of code for every role.

Three kinds: "choice" (one label out of a set), "extract" (a ranked list of phrases that occur
literally in the text) and "chat" (a free reply, told the result of a choice role). The people
who read our errors are editing a file, so every error starts with where the role came from and
names the field ("roles/x.json: labels[3].name: ...").

Only the standard library is imported, so anything can validate a role without the engine.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

KINDS = ("choice", "extract", "chat")
MAX_PHRASES = 50
LANGUAGES = ("zh", "en")
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,39}")
MAX_DESCRIPTION = 300
MAX_LABEL_NAME = 60
MAX_EMOJI = 8
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_INLINE_BYTES = 64_000

BUILTIN_DIR = Path(__file__).with_name("builtin")

_COMMON_FIELDS = ("name", "kind", "description", "title")
_KIND_FIELDS = {
    "choice": _COMMON_FIELDS + ("instruction", "labels", "examples", "prompts", "default_prompt", "reads"),
    "extract": _COMMON_FIELDS + ("instruction", "examples", "max_phrases", "reads"),
    "chat": _COMMON_FIELDS + ("mood_from", "prompts", "default_prompt"),
}


class RoleError(ValueError):
    """A role that cannot be used; the message starts with its source and names the field."""


@dataclass(frozen=True)
class _Limits:
    """What a source may hold: an inline role is smaller, since it is parsed per request."""

    kinds: tuple[str, ...]
    max_labels: int
    max_examples: int
    what: str  # how the limits' owner is named in an error


_FILE_LIMITS = _Limits(kinds=KINDS, max_labels=200, max_examples=5000, what="a role")
_INLINE_LIMITS = _Limits(kinds=("choice",), max_labels=50, max_examples=200, what="an inline role")


# --- the parsed forms ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Label:
    name: str
    description: str = ""
    display: dict[str, str] = field(default_factory=dict)  # lang -> text
    emoji: str = ""

    def shown(self, lang: str = "zh") -> str:
        """How a person sees the label: in their language, else in the other one, else its name."""
        if self.display.get(lang):
            return self.display[lang]
        return next((text for other, text in self.display.items() if other != lang and text), self.name)


@dataclass(frozen=True)
class Example:
    text: str
    label: str = ""  # a choice role's example
    phrases: tuple[str, ...] = ()  # an extract role's: its key phrases, best first, each in the text


@dataclass(frozen=True)
class ChoicePrompt:
    name: str
    description: str
    format: str  # "plain": the template is the whole prompt; "chat": the user turn of the chat template
    template: str  # contains "{text}" exactly once
    label_words: dict[str, str]  # label -> the exact text of the model's next token
    system: str | None = None


@dataclass(frozen=True)
class ChatPromptSpec:
    name: str
    description: str
    system: str
    user_template: str  # "{message}" once, "{tag}" (the mood, in `tags` wording) at most once
    tags: dict[str, str]
    tags_by_language: dict[str, dict[str, str]] | None = None
    examples: tuple[tuple[str, str, str], ...] = ()  # (message, label, reply)

    @property
    def mood_follows_message(self) -> bool:
        """Whether the tag comes after the message: then the tokens up to the message's end do not
        depend on the mood, and one pass over them can serve both the mood (read part-way up by a
        head) and the reply."""
        return "{tag}" not in self.user_template.split("{message}")[0]

    @property
    def key(self) -> str:
        """What heads and adapters made for this prompt are filed under."""
        return f"chat-{self.name}"

    def head_key(self, adapter_sha256: str | None = None) -> str:
        """The key of a head that reads at the end of the user's message in this prompt, on a chat
        lane that runs the adapter with this sha256 (None: the model's own weights): the adapter
        changes the states the head reads, so a head fits only the weights it read."""
        return self.key if adapter_sha256 is None else f"{self.key}@{adapter_sha256[:12]}"


@dataclass(frozen=True)
class RoleDefinition:
    name: str
    kind: str
    description: str
    source: str  # "builtin", or the file path, or "request"
    title: dict[str, str]
    instruction: dict[str, str] = field(default_factory=dict)
    labels: tuple[Label, ...] = ()
    examples: tuple[Example, ...] = ()
    prompts: dict = field(default_factory=dict)  # name -> ChoicePrompt (choice) or ChatPromptSpec (chat)
    default_prompt: str | None = None
    reads: str | None = None
    mood_from: str | None = None
    max_phrases: int | None = None  # an extract role's: how many phrases it returns at most

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    def label(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        known = _listing(self.label_names)
        raise RoleError(f"{self.source}: role {self.name!r}: unknown label {name!r}; labels: {known}")

    def prompt(self, name: str | None = None):
        """The named prompt, else the default one; None when the role has no prompts and none is named
        (the caller then builds one from the instruction and the labels)."""
        name = name if name is not None else self.default_prompt
        if name is None:
            return None
        if name not in self.prompts:
            known = _listing(self.prompts) if self.prompts else "(none)"
            raise RoleError(f"{self.source}: role {self.name!r}: unknown prompt {name!r}; prompts: {known}")
        return self.prompts[name]

    def shown(self, label: str, lang: str = "zh") -> str:
        """The line a person sees for a result: `😄 LLM 情感判断: 正面` (CLI, page, API)."""
        found = self.label(label)
        title = self.title.get(lang) or self.name
        return f"{found.emoji} {title}: {found.shown(lang)}".strip()

    def fingerprint(self) -> str:
        """A key for what was learned from this role (heads): it changes with anything the model
        sees or the head reads, and not with how the role is shown to a person, so renaming a
        label's display or emoji keeps its trained head."""
        scoring = {
            "kind": self.kind,
            "instruction": self.instruction,
            "labels": [[label.name, label.description] for label in self.labels],
            # (an extract role's phrases only where there are some: choice roles keep their keys)
            "examples": [
                [example.text, example.label, *([list(example.phrases)] if example.phrases else [])]
                for example in self.examples
            ],
            "prompts": {name: asdict(prompt) for name, prompt in self.prompts.items()},
            "reads": self.reads,
            "mood_from": self.mood_from,
            **({"max_phrases": self.max_phrases} if self.max_phrases is not None else {}),
        }
        return hashlib.sha256(_canonical(scoring).encode("utf-8")).hexdigest()


# --- entry points -------------------------------------------------------------------------------


def parse_role(data: Any, source: str) -> RoleDefinition:
    """A role from decoded JSON; `source` names it in errors and is kept as its source."""
    return _parse(data, where=source, source=source, limits=_FILE_LIMITS)


def load_role_file(path: Path) -> RoleDefinition:
    path = Path(path)
    return _parse(_read_json(path, str(path)), where=str(path), source=str(path), limits=_FILE_LIMITS)


def parse_inline_role(data: Any) -> RoleDefinition:
    """A role sent with an HTTP request. Smaller limits than a file's, since it arrives, and is
    parsed and learned from, with every request that carries it."""
    where = "request"
    try:
        size = len(_canonical(data).encode("utf-8"))
    except (TypeError, ValueError):
        raise RoleError(f"{where}: the role is not JSON data") from None
    if size > MAX_INLINE_BYTES:
        raise RoleError(
            f"{where}: the role is {size} bytes as JSON; an inline role may have at most {MAX_INLINE_BYTES} "
            "(a bigger one belongs in a role file)"
        )
    return _parse(data, where=where, source=where, limits=_INLINE_LIMITS)


# --- reading files ------------------------------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json keeps the last of two equal keys silently; in a hand-edited file that is a mistake.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _read_json(path: Path, where: str) -> Any:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)  # never read a huge file whole just to refuse it
    except OSError as err:
        raise RoleError(f"{where}: cannot read the file: {err.strerror or err}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise RoleError(f"{where}: larger than 2 MB; a role file holds prompts and examples, not a data set")
    try:
        text = raw.decode("utf-8-sig")  # some editors start UTF-8 files with a byte-order mark
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise RoleError(f"{where}: line {line}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as err:
        raise RoleError(f"{where}: line {err.lineno} column {err.colno}: broken JSON: {err.msg}") from None
    except _DuplicateKey as err:
        raise RoleError(f"{where}: {err.args[0]}: the key appears twice in one JSON object") from None


# --- validation ---------------------------------------------------------------------------------


class _Checker:
    """Type and shape checks that raise a RoleError naming the source and the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, message: str) -> NoReturn:
        raise RoleError(f"{self.where}: {path}: {message}" if path else f"{self.where}: {message}")

    def obj(
        self, value: Any, path: str, required: Sequence[str], optional: Sequence[str] = (), what: str = "field"
    ) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"must be an object, not {_json_type(value)}")
        allowed = list(required) + list(optional)
        for key in value:
            if key not in allowed:  # typo protection: a misspelt optional field would otherwise be ignored
                hint = _did_you_mean(key, allowed)
                self.fail(_join(path, key), f"unknown {what}{hint}; {what}s: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.fail(_join(path, key), "required")
        return value

    def text(self, value: Any, path: str, *, nonempty: bool = True, max_len: int | None = None) -> str:
        if not isinstance(value, str):
            self.fail(path, f"must be a string, not {_json_type(value)}")
        if nonempty and not value.strip():
            self.fail(path, "must not be empty")
        if max_len is not None and len(value) > max_len:
            self.fail(path, f"{len(value)} characters; at most {max_len}")
        return value

    def name(self, value: Any, path: str) -> str:
        value = self.text(value, path)
        if not NAME_PATTERN.fullmatch(value):
            self.fail(path, f"{value!r} is not a name: a-z first, then up to 39 of a-z 0-9 _ -")
        return value

    def items(self, value: Any, path: str, max_len: int | None, what: str = "") -> list:
        if not isinstance(value, list):
            self.fail(path, f"must be a list, not {_json_type(value)}")
        if max_len is not None and len(value) > max_len:
            self.fail(path, f"{len(value)} items; {what or 'the list'} may have at most {max_len}")
        return value

    def by_language(self, value: Any, path: str, *, at_least_one: bool) -> dict[str, str]:
        """{"zh": str, "en": str}, each optional."""
        found = self.obj(value, path, required=(), optional=LANGUAGES, what="language")
        if at_least_one and not found:
            self.fail(path, f"give at least one of {', '.join(LANGUAGES)}")
        return {lang: self.text(text, f"{path}.{lang}") for lang, text in found.items()}

    def per_label(self, value: Any, path: str, labels: Sequence[str]) -> dict[str, str]:
        """{label: str} covering exactly `labels`, each text non-empty."""
        if not isinstance(value, dict):
            self.fail(path, f"must be an object, not {_json_type(value)}")
        missing = [label for label in labels if label not in value]
        if missing:
            self.fail(path, f"missing label(s) {_listing(missing)}; give one entry per label")
        for key in value:
            if key not in labels:
                self.fail(_join(path, key), f"not a label; labels: {_listing(labels)}")
        # In the role's label order, whatever order the file used: order is what a head's outputs follow.
        return {label: self.text(value[label], _join(path, label)) for label in labels}


def _parse(data: Any, where: str, source: str, limits: _Limits) -> RoleDefinition:
    c = _Checker(where)
    if not isinstance(data, dict):
        c.fail("", f"a role is a JSON object, not {_json_type(data)}")
    kind = _kind(c, data, limits)
    for other in KINDS:
        for key in data:
            if other != kind and key in _KIND_FIELDS[other] and key not in _KIND_FIELDS[kind]:
                c.fail(key, f"a field of {_a(other)} role, not of {_a(kind)} role")
    required = ("name", "kind", "description")
    c.obj(data, "", required=required, optional=[key for key in _KIND_FIELDS[kind] if key not in required])
    name = c.name(data["name"], "name")
    description = c.text(data["description"], "description", max_len=MAX_DESCRIPTION)
    if "\n" in description:
        c.fail("description", "one line: it is what `allinone roles` shows beside the name")
    common = dict(name=name, kind=kind, description=description, source=source, title=_title(c, data, name))
    if kind == "chat":
        return _parse_chat(c, data, common)
    if kind == "extract":
        return _parse_extract(c, data, common, limits)
    return _parse_choice(c, data, common, limits)


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _kind(c: _Checker, data: dict, limits: _Limits) -> str:
    if "kind" not in data:
        c.fail("kind", f"required: one of {', '.join(KINDS)}")
    kind = data["kind"]
    if kind not in KINDS:
        c.fail("kind", f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if kind not in limits.kinds:
        c.fail("kind", f"{limits.what} must be of kind {' or '.join(limits.kinds)}, not {kind!r}")
    return kind


def _title(c: _Checker, data: dict, name: str) -> dict[str, str]:
    given = c.by_language(data["title"], "title", at_least_one=True) if "title" in data else {}
    # Either language stands in for the other: a person always sees some title.
    zh = given.get("zh") or given.get("en") or name
    en = given.get("en") or given.get("zh") or name
    return {"zh": zh, "en": en}


def _parse_choice(c: _Checker, data: dict, common: dict, limits: _Limits) -> RoleDefinition:
    if "labels" not in data:
        c.fail("labels", "required: the labels this role chooses from")
    labels = _labels(c, data["labels"], limits)
    names = tuple(label.name for label in labels)
    prompts = _choice_prompts(c, data["prompts"], names) if "prompts" in data else {}
    instruction = _instruction(c, data["instruction"]) if "instruction" in data else {}
    if not instruction and not prompts:
        # Without prompts of its own, the role's prompt is built from the instruction and labels.
        c.fail("instruction", "required unless the role gives its own prompts")
    examples = _examples(c, data.get("examples", []), names, limits)
    reads = c.name(data["reads"], "reads") if "reads" in data else None
    if reads == common["name"]:
        c.fail("reads", "a role cannot read its own pass; name the role whose pass it shares")
    return RoleDefinition(
        **common,
        instruction=instruction,
        labels=labels,
        examples=examples,
        prompts=prompts,
        default_prompt=_default_prompt(c, data, prompts),
        reads=reads,
    )


def _parse_extract(c: _Checker, data: dict, common: dict, limits: _Limits) -> RoleDefinition:
    if "instruction" not in data:
        c.fail("instruction", "required: what to take from the text")
    max_phrases = data.get("max_phrases", 10)
    if isinstance(max_phrases, bool) or not isinstance(max_phrases, int) or not 1 <= max_phrases <= MAX_PHRASES:
        c.fail("max_phrases", f"a whole number from 1 to {MAX_PHRASES}, not {max_phrases!r}")
    reads = c.name(data["reads"], "reads") if "reads" in data else None
    if reads == common["name"]:
        c.fail("reads", "a role cannot read its own pass; name the role whose pass it shares")
    return RoleDefinition(
        **common,
        instruction=_instruction(c, data["instruction"]),
        examples=_phrase_examples(c, data.get("examples", []), limits),
        reads=reads,
        max_phrases=max_phrases,
    )


def _phrase_examples(c: _Checker, value: Any, limits: _Limits) -> tuple[Example, ...]:
    """Each example's phrases must occur in its text (case aside): an extract role only ever
    returns text that is there."""
    examples = []
    for i, item in enumerate(c.items(value, "examples", limits.max_examples, limits.what)):
        spec = c.obj(item, f"examples[{i}]", required=("text", "phrases"))
        text = c.text(spec["text"], f"examples[{i}].text")
        phrases = []
        for j, phrase in enumerate(c.items(spec["phrases"], f"examples[{i}].phrases", MAX_PHRASES, "an example")):
            phrase = c.text(phrase, f"examples[{i}].phrases[{j}]").strip()
            if phrase.lower() not in text.lower():
                c.fail(f"examples[{i}].phrases[{j}]", f"{phrase!r} does not occur in the example's text")
            phrases.append(phrase)
        if not phrases:
            c.fail(f"examples[{i}].phrases", "give at least one phrase")
        examples.append(Example(text=text, phrases=tuple(phrases)))
    return tuple(examples)


def _instruction(c: _Checker, value: Any) -> dict[str, str]:
    if isinstance(value, str):
        return {_language_of(c.text(value, "instruction")): value}
    return c.by_language(value, "instruction", at_least_one=True)


def _language_of(text: str) -> str:
    # A bare instruction is filed under the language it is written in, so a prompt builder that
    # prefers the message's language knows what it has.
    return "zh" if any("\u3400" <= ch <= "\u9fff" for ch in text) else "en"


def _labels(c: _Checker, value: Any, limits: _Limits) -> tuple[Label, ...]:
    items = c.items(value, "labels", max_len=None)
    if not 2 <= len(items) <= limits.max_labels:
        c.fail("labels", f"{len(items)} label(s); {limits.what} has 2 to {limits.max_labels}")
    labels: list[Label] = []
    first_at: dict[str, int] = {}
    for i, item in enumerate(items):
        label, name_path = _label(c, item, f"labels[{i}]")
        if label.name in first_at:
            c.fail(name_path, f"duplicate label {label.name!r} (also labels[{first_at[label.name]}])")
        first_at[label.name] = i
        labels.append(label)
    return tuple(labels)


def _label(c: _Checker, item: Any, path: str) -> tuple[Label, str]:
    if isinstance(item, str):
        return Label(name=_label_name(c, item, path)), path
    spec = c.obj(item, path, required=("name",), optional=("description", "display", "emoji"))
    name = _label_name(c, spec["name"], f"{path}.name")
    description = c.text(spec.get("description", ""), f"{path}.description", nonempty=False)
    display = c.by_language(spec.get("display", {}), f"{path}.display", at_least_one=False)
    emoji = c.text(spec.get("emoji", ""), f"{path}.emoji", nonempty=False, max_len=MAX_EMOJI)
    return Label(name=name, description=description, display=display, emoji=emoji), f"{path}.name"


def _label_name(c: _Checker, value: Any, path: str) -> str:
    name = c.text(value, path).strip()
    if len(name) > MAX_LABEL_NAME:
        c.fail(path, f"{len(name)} characters; a label name has at most {MAX_LABEL_NAME}")
    if "\n" in name or "\r" in name:
        c.fail(path, "a label name is one line")
    return name


def _examples(c: _Checker, value: Any, labels: tuple[str, ...], limits: _Limits) -> tuple[Example, ...]:
    examples = []
    for i, item in enumerate(c.items(value, "examples", limits.max_examples, limits.what)):
        spec = c.obj(item, f"examples[{i}]", required=("text", "label"))
        text = c.text(spec["text"], f"examples[{i}].text")
        label = c.text(spec["label"], f"examples[{i}].label").strip()
        if label not in labels:
            c.fail(f"examples[{i}].label", f"unknown label {label!r}; labels: {_listing(labels)}")
        examples.append(Example(text=text, label=label))
    return tuple(examples)


def _prompt_entries(c: _Checker, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        c.fail("prompts", f"must be an object (prompt name -> prompt), not {_json_type(value)}")
    if not value:
        c.fail("prompts", "give at least one prompt")
    for name in value:
        # Prompt names go into the file names of heads and adapters, hence the same rule as roles.
        if not NAME_PATTERN.fullmatch(name):
            c.fail(_join("prompts", name), "not a prompt name: a-z first, then up to 39 of a-z 0-9 _ -")
    return value


def _choice_prompts(c: _Checker, value: Any, labels: tuple[str, ...]) -> dict[str, ChoicePrompt]:
    prompts = {}
    for name, item in _prompt_entries(c, value).items():
        path = f"prompts.{name}"
        spec = c.obj(item, path, required=("description", "format", "template", "label_words"), optional=("system",))
        fmt = spec["format"]
        if fmt not in ("plain", "chat"):
            c.fail(f"{path}.format", f'{fmt!r}: must be "plain" (the whole prompt) or "chat" (a chat-template turn)')
        template = c.text(spec["template"], f"{path}.template")
        # Everything before the text is a cached prefix, and the text goes in one place.
        if template.count("{text}") != 1:
            c.fail(f"{path}.template", f'must contain "{{text}}" exactly once (found {template.count("{text}")})')
        system = None
        if "system" in spec:
            if fmt != "chat":
                c.fail(f"{path}.system", 'only a prompt of format "chat" has a system turn')
            system = c.text(spec["system"], f"{path}.system")
        label_words = c.per_label(spec["label_words"], f"{path}.label_words", labels)
        _refuse_shared_words(c, label_words, f"{path}.label_words")
        prompts[name] = ChoicePrompt(
            name=name,
            description=c.text(spec["description"], f"{path}.description", nonempty=False),
            format=fmt,
            template=template,
            label_words=label_words,
            system=system,
        )
    return prompts


def _refuse_shared_words(c: _Checker, label_words: dict[str, str], path: str) -> None:
    # Two labels scored by the same token would always tie.
    owner: dict[str, str] = {}
    for label, word in label_words.items():
        if word in owner:
            c.fail(_join(path, label), f"the same word as {owner[word]!r} ({word!r}): the two could never differ")
        owner[word] = label


def _parse_chat(c: _Checker, data: dict, common: dict) -> RoleDefinition:
    if "mood_from" not in data:
        c.fail("mood_from", "required: the choice role whose result the reply is told (e.g. sentiment)")
    mood_from = c.name(data["mood_from"], "mood_from")
    if "prompts" not in data:
        c.fail("prompts", "required: a chat role needs at least one prompt")
    prompts = {name: _chat_prompt(c, name, item) for name, item in _prompt_entries(c, data["prompts"]).items()}
    default = _default_prompt(c, data, prompts)
    return RoleDefinition(**common, prompts=prompts, default_prompt=default, mood_from=mood_from)


def _chat_prompt(c: _Checker, name: str, item: Any) -> ChatPromptSpec:
    path = f"prompts.{name}"
    spec = c.obj(
        item,
        path,
        required=("description", "system", "user_template", "tags"),
        optional=("tags_by_language", "examples"),
    )
    user_template = c.text(spec["user_template"], f"{path}.user_template")
    if user_template.count("{message}") != 1:
        found = user_template.count("{message}")
        c.fail(f"{path}.user_template", f'must contain "{{message}}" exactly once (found {found})')
    if user_template.count("{tag}") > 1:
        c.fail(f"{path}.user_template", 'may contain "{tag}" at most once')
    tags_value = spec["tags"]
    if not isinstance(tags_value, dict) or not tags_value:
        c.fail(f"{path}.tags", "must be an object: mood label -> how the reply is told it")
    # Which labels the tags must cover is known once the mood role is (RoleRegistry.discover).
    tags = c.per_label(tags_value, f"{path}.tags", tuple(tags_value))
    by_language = None
    if "tags_by_language" in spec:
        found = c.obj(
            spec["tags_by_language"], f"{path}.tags_by_language", required=(), optional=LANGUAGES, what="language"
        )
        if not found:
            c.fail(f"{path}.tags_by_language", f"give at least one of {', '.join(LANGUAGES)}, or leave it out")
        by_language = {
            lang: c.per_label(words, f"{path}.tags_by_language.{lang}", tuple(tags)) for lang, words in found.items()
        }
    return ChatPromptSpec(
        name=name,
        description=c.text(spec["description"], f"{path}.description", nonempty=False),
        system=c.text(spec["system"], f"{path}.system", nonempty=False),
        user_template=user_template,
        tags=tags,
        tags_by_language=by_language,
        examples=_chat_examples(c, spec.get("examples", []), f"{path}.examples", tuple(tags)),
    )


def _chat_examples(c: _Checker, value: Any, path: str, labels: tuple[str, ...]) -> tuple[tuple[str, str, str], ...]:
    examples = []
    # They sit in every request's prefix, so a few are plenty; the limit keeps a typo from hurting.
    for i, item in enumerate(c.items(value, path, 50)):
        spec = c.obj(item, f"{path}[{i}]", required=("message", "label", "reply"))
        message = c.text(spec["message"], f"{path}[{i}].message")
        label = c.text(spec["label"], f"{path}[{i}].label")
        if label not in labels:
            c.fail(f"{path}[{i}].label", f"unknown label {label!r}; the tags' labels: {_listing(labels)}")
        examples.append((message, label, c.text(spec["reply"], f"{path}[{i}].reply")))
    return tuple(examples)


def _default_prompt(c: _Checker, data: dict, prompts: dict) -> str | None:
    if "default_prompt" not in data:
        return next(iter(prompts), None)
    if not prompts:
        c.fail("default_prompt", "the role has no prompts to choose from")
    name = c.text(data["default_prompt"], "default_prompt")
    if name not in prompts:
        c.fail("default_prompt", f"unknown prompt {name!r}; prompts: {_listing(prompts)}")
    return name


# --- the registry -------------------------------------------------------------------------------


@dataclass
class RoleRegistry:
    roles: dict[str, RoleDefinition]  # name -> definition, in listing order
    # name -> how errors name its file ("builtin chat.json" where the definition just says "builtin")
    _origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def discover(cls, home: Path | None, extra: Sequence[Path] = ()) -> RoleRegistry:
        """Built-in roles, then $ALLINONE_HOME/roles/*.json, then `extra` (files or directories);
        a later role of the same name replaces the earlier one, so user roles win. A broken file
        is an error, never skipped: a role that silently vanished would be harder to find."""
        registry = cls(roles={})
        registry._add_directory(BUILTIN_DIR, builtin=True)
        if home is not None and (Path(home) / "roles").is_dir():
            registry._add_directory(Path(home) / "roles")
        for path in map(Path, extra):
            if path.is_dir():
                registry._add_directory(path)
            else:
                registry._add(load_role_file(path), str(path))
        registry._check_references()
        return registry

    def get(self, name: str) -> RoleDefinition:
        try:
            return self.roles[name]
        except KeyError:
            raise RoleError(f"unknown role {name!r}; roles: {', '.join(self.roles)}") from None

    def choice_roles(self) -> list[RoleDefinition]:
        return [role for role in self.roles.values() if role.kind == "choice"]

    def names(self) -> list[str]:
        return list(self.roles)

    def origin(self, name: str) -> str:
        """Where the role in use came from: "builtin <file>" or the file's path."""
        return self._origins.get(name, self.get(name).source)

    def _add_directory(self, directory: Path, builtin: bool = False) -> None:
        # Dot-files are editors' lock and backup files, not roles.
        paths = sorted(p for p in directory.glob("*.json") if p.is_file() and not p.name.startswith("."))
        defined_here: dict[str, str] = {}
        for path in paths:
            where = f"builtin {path.name}" if builtin else str(path)
            data = _read_json(path, where)
            role = _parse(data, where=where, source="builtin" if builtin else str(path), limits=_FILE_LIMITS)
            # Across places a later file wins on purpose; two in one directory is a mistake.
            if role.name in defined_here:
                raise RoleError(f"{where}: name: role {role.name!r} is also defined in {defined_here[role.name]}")
            defined_here[role.name] = where
            self._add(role, where)

    def _add(self, role: RoleDefinition, where: str) -> None:
        self.roles[role.name] = role  # an override keeps the overridden role's place in the listing
        self._origins[role.name] = where

    def _check_references(self) -> None:
        for name, role in self.roles.items():
            where = self._origins.get(name, role.source)
            if role.reads is not None:
                target = self._choice_role(where, "reads", role.reads)
                if target.reads is not None:
                    # A pass belongs to the role that runs it; chains would hide whose pass it is.
                    raise RoleError(
                        f"{where}: reads: {target.name!r} reads {target.reads!r}'s pass itself; "
                        f"name {target.reads!r} instead"
                    )
            if role.kind == "chat":
                self._check_tags(where, role, self._choice_role(where, "mood_from", role.mood_from))

    def _choice_role(self, where: str, path: str, name: str) -> RoleDefinition:
        if name not in self.roles:
            raise RoleError(f"{where}: {path}: no role {name!r}; roles: {', '.join(self.roles)}")
        role = self.roles[name]
        if role.kind != "choice":
            raise RoleError(f"{where}: {path}: {name!r} is a {role.kind} role; it must name a choice role")
        return role

    def _check_tags(self, where: str, chat: RoleDefinition, mood: RoleDefinition) -> None:
        labels = set(mood.label_names)
        for prompt in chat.prompts.values():
            missing = sorted(labels - set(prompt.tags))
            extra = sorted(set(prompt.tags) - labels)
            if missing or extra:
                problems = ([f"missing {_listing(missing)}"] if missing else []) + (
                    [f"not labels of it: {_listing(extra)}"] if extra else []
                )
                raise RoleError(
                    f"{where}: prompts.{prompt.name}.tags: must cover exactly the labels of {mood.name!r} "
                    f"(from {self._origins.get(mood.name, mood.source)}): {'; '.join(problems)}"
                )


# --- small helpers ------------------------------------------------------------------------------


def _canonical(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _listing(names, limit: int = 20) -> str:
    names = [repr(name) for name in names]
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def _did_you_mean(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
