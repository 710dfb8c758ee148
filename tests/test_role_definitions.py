"""Role files: the built-in ones reproduce the Python prompts exactly, user files override them, and
every invalid role is refused with an error that names its file and the field. No model needed."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest

from allinone.roles.definition import (
    BUILTIN_DIR,
    MAX_INLINE_BYTES,
    Label,
    RoleError,
    RoleRegistry,
    load_role_file,
    parse_inline_role,
    parse_role,
)

EXAMPLE_FILE = BUILTIN_DIR.parent / "examples" / "customer-service.json"

CHOICE = {
    "name": "mood",
    "kind": "choice",
    "description": "A test role.",
    "instruction": "Which mood?",
    "labels": ["happy", {"name": "sad", "description": "feeling down", "emoji": "😢"}],
    "examples": [{"text": "yay", "label": "happy"}],
    "prompts": {
        "plain": {
            "description": "",
            "format": "plain",
            "template": "Mood of: {text}\nAnswer:",
            "label_words": {"happy": " happy", "sad": " sad"},
        }
    },
}


def choice(**changes) -> dict:
    role = copy.deepcopy(CHOICE)
    for key, value in changes.items():
        if value is None:
            role.pop(key, None)
        else:
            role[key] = value
    return role


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def refused(path: Path, *parts: str) -> str:
    """Loading `path` fails, and the message starts with the path and contains each part."""
    with pytest.raises(RoleError) as caught:
        load_role_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    for part in parts:
        assert part in message, message
    return message


# --- the built-in roles -------------------------------------------------------------------------


def test_builtin_roles_and_the_example_load():
    registry = RoleRegistry.discover(None)
    assert {"sentiment", "emotion", "intent", "chat"} <= set(registry.names())
    assert all(role.source == "builtin" for role in registry.roles.values())
    assert [role.name for role in registry.choice_roles()] == ["emotion", "intent", "sentiment"]
    example = load_role_file(EXAMPLE_FILE)
    assert example.kind == "choice" and len(example.labels) >= 5 and example.examples
    assert registry.get("sentiment").title == {"zh": "LLM 情感判断", "en": "Sentiment"}
    assert registry.get("emotion").label_names == ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")
    assert registry.get("emotion").label("neutral").shown("zh") == "平静"


def test_trained_roles_have_examples_of_every_label_in_both_languages():
    roles = [RoleRegistry.discover(None).get("intent"), RoleRegistry.discover(None).get("emotion")]
    for role in roles + [load_role_file(EXAMPLE_FILE)]:
        for label in role.labels:
            texts = [example.text for example in role.examples if example.label == label.name]
            chinese = [text for text in texts if any("\u4e00" <= ch <= "\u9fff" for ch in text)]
            assert chinese and len(chinese) < len(texts), (role.name, label.name)
            assert label.description and label.emoji and set(label.display) == {"zh", "en"}, (role.name, label.name)


# The packaged heads and the chat adapter were trained under these exact prompts (when they still
# lived in Python): a changed character would silently invalidate them, so the move to data is held
# to the old text by a digest of it.
PROMPTS_TRAINED_UNDER = {
    "original": "ffb3d5244ea8309a",
    "fewshot": "2c4485d8c10ba3c5",
    "original-chat": "70b06671dc6ee694",
}
CHAT_PROMPTS_TRAINED_UNDER = {"original": "9282ef2f9b0f125e", "warm": "9edabbf16a2bbcfe"}


def digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:16]


def test_sentiment_prompts_are_the_ones_the_packaged_heads_were_trained_under():
    role = RoleRegistry.discover(None).get("sentiment")
    assert role.default_prompt == "fewshot"
    found = {name: digest([p.template, p.system, p.format, p.label_words]) for name, p in role.prompts.items()}
    assert found == PROMPTS_TRAINED_UNDER


def test_chat_prompts_are_the_ones_the_chat_adapter_was_trained_under():
    role = RoleRegistry.discover(None).get("chat")
    assert role.mood_from == "sentiment" and role.default_prompt == "warm"
    found = {
        name: digest([p.system, p.user_template, p.tags, p.tags_by_language, [list(e) for e in p.examples]])
        for name, p in role.prompts.items()
    }
    assert found == CHAT_PROMPTS_TRAINED_UNDER


# --- where roles come from ----------------------------------------------------------------------


def test_a_user_role_overrides_a_builtin_and_a_new_one_appears(tmp_path):
    own = write(tmp_path / "roles" / "emotion.json", choice(name="emotion", prompts=None))
    write(tmp_path / "roles" / "mood.json", choice())
    registry = RoleRegistry.discover(tmp_path)
    assert registry.get("emotion").source == str(own)
    assert registry.get("emotion").label_names == ("happy", "sad")
    assert registry.get("mood").prompt().name == "plain"
    builtin_order = RoleRegistry.discover(None).names()
    assert registry.names() == builtin_order + ["mood"]  # an override keeps its place


def test_extra_paths_file_and_directory(tmp_path):
    one = write(tmp_path / "one.role", choice(name="one"))
    write(tmp_path / "more" / "two.json", choice(name="two"))
    write(tmp_path / "more" / "three.json", choice(name="three"))
    registry = RoleRegistry.discover(None, [one, tmp_path / "more"])
    assert registry.names()[-3:] == ["one", "three", "two"]
    with pytest.raises(RoleError, match="cannot read"):
        RoleRegistry.discover(None, [tmp_path / "missing.json"])


def test_two_files_in_one_directory_may_not_define_one_role(tmp_path):
    write(tmp_path / "roles" / "a.json", choice())
    write(tmp_path / "roles" / "b.json", choice())
    with pytest.raises(RoleError, match=r"b\.json: name: role 'mood' is also defined in .*a\.json"):
        RoleRegistry.discover(tmp_path)


def test_unknown_role_lists_the_roles():
    with pytest.raises(RoleError, match=r"unknown role 'nope'; roles: .*sentiment"):
        RoleRegistry.discover(None).get("nope")


# --- refused files ------------------------------------------------------------------------------


def test_broken_json_names_line_and_column(tmp_path):
    path = write(tmp_path / "x.json", '{\n  "name": "x",\n  "kind" "choice"\n}')
    refused(path, "line 3 column 10", "broken JSON")


def test_invalid_utf8(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'{"name": "x",\n "description": "caf\xe9"}')
    refused(path, "line 2", "not UTF-8")


def test_a_file_larger_than_2mb(tmp_path):
    path = write(tmp_path / "big.json", " " * (2 * 1024 * 1024 + 1))
    refused(path, "larger than 2 MB")


def test_a_key_given_twice(tmp_path):
    path = write(tmp_path / "x.json", '{"name": "a", "name": "b"}')
    refused(path, "name: the key appears twice")


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(choice()).encode())
    assert load_role_file(path).name == "mood"


def labels(n: int) -> list[str]:
    return [f"l{i}" for i in range(n)]


TEMPLATE = "prompts.plain.template"
BAD_ROLES = {
    "not an object": ([1, 2], "", "a role is a JSON object, not a list"),
    "missing name": (choice(name=None), "name", "required"),
    "bad name": (choice(name="Mood!"), "name", "is not a name"),
    "unknown kind": (choice(kind="summary"), "kind", "unknown kind 'summary'; known kinds: choice, extract, chat"),
    "a choice field in an extract role": (
        choice(kind="extract"),
        "labels",
        "a field of a choice role, not of an extract role",
    ),
    "unknown field": (dict(choice(), lables=[]), "lables", "unknown field (did you mean 'labels'?)"),
    "chat field in a choice role": (dict(choice(), mood_from="x"), "mood_from", "a field of a chat role"),
    "long description": (choice(description="x" * 301), "description", "at most 300"),
    "one label": (choice(labels=["a"], prompts=None, examples=None), "labels", "1 label(s)"),
    "too many labels": (choice(labels=labels(201), prompts=None, examples=None), "labels", "201 label(s)"),
    "duplicate label": (
        choice(labels=["a", "b", {"name": " b "}], prompts=None, examples=None),
        "labels[2].name",
        "duplicate label 'b' (also labels[1])",
    ),
    "empty label": (choice(labels=["a", "  "], prompts=None, examples=None), "labels[1]", "must not be empty"),
    "long emoji": (
        choice(labels=["a", {"name": "b", "emoji": "😀" * 9}], prompts=None, examples=None),
        "labels[1].emoji",
        "at most 8",
    ),
    "unknown example label": (
        choice(examples=[{"text": "a", "label": "happy"}, {"text": "b", "label": "angry"}]),
        "examples[1].label",
        "unknown label 'angry'",
    ),
    "empty example text": (choice(examples=[{"text": " ", "label": "happy"}]), "examples[0].text", "must not be empty"),
    "no instruction nor prompts": (choice(instruction=None, prompts=None), "instruction", "required unless"),
    "template without text": (
        choice(prompts={"plain": dict(CHOICE["prompts"]["plain"], template="Mood:")}),
        TEMPLATE,
        'must contain "{text}" exactly once (found 0)',
    ),
    "template with text twice": (
        choice(prompts={"plain": dict(CHOICE["prompts"]["plain"], template="{text} {text}")}),
        TEMPLATE,
        "(found 2)",
    ),
    "label words missing a label": (
        choice(prompts={"plain": dict(CHOICE["prompts"]["plain"], label_words={"happy": " happy"})}),
        "prompts.plain.label_words",
        "missing label(s) 'sad'",
    ),
    "label words with an extra label": (
        choice(prompts={"plain": dict(CHOICE["prompts"]["plain"], label_words={"happy": "h", "sad": "s", "meh": "m"})}),
        "prompts.plain.label_words.meh",
        "not a label",
    ),
    "system in a plain prompt": (
        choice(prompts={"plain": dict(CHOICE["prompts"]["plain"], system="Be strict.")}),
        "prompts.plain.system",
        'only a prompt of format "chat"',
    ),
    "unknown default prompt": (choice(default_prompt="fancy"), "default_prompt", "unknown prompt 'fancy'"),
    "reads itself": (choice(reads="mood"), "reads", "cannot read its own pass"),
}


@pytest.mark.parametrize("case", BAD_ROLES)
def test_a_bad_role_is_refused_naming_file_and_field(tmp_path, case):
    data, field, message = BAD_ROLES[case]
    path = write(tmp_path / "roles" / "x.json", data)
    text = refused(path, message)
    if field:
        assert text.startswith(f"{path}: {field}: "), text


def test_parse_role_names_its_source():
    with pytest.raises(RoleError, match=r"^somewhere: labels\[1\]: must not be empty"):
        parse_role(choice(labels=["a", ""]), "somewhere")


CHAT = {
    "name": "talk",
    "kind": "chat",
    "description": "A test chat role.",
    "mood_from": "sentiment",
    "prompts": {
        "short": {
            "description": "",
            "system": "Be kind.",
            "user_template": "{message} ({tag})",
            "tags": {"positive": "good", "negative": "bad"},
            "examples": [{"message": "hi", "label": "positive", "reply": "hello"}],
        }
    },
}


def chat_prompt(**changes) -> dict:
    role = copy.deepcopy(CHAT)
    role["prompts"]["short"].update(changes)
    return role


@pytest.mark.parametrize(
    "data, field, message",
    [
        (chat_prompt(user_template="no message"), "prompts.short.user_template", '"{message}" exactly once'),
        (chat_prompt(user_template="{message} {tag} {tag}"), "prompts.short.user_template", "at most once"),
        (
            chat_prompt(examples=[{"message": "hi", "label": "meh", "reply": "ok"}]),
            "prompts.short.examples[0].label",
            "unknown label 'meh'",
        ),
        (
            chat_prompt(tags_by_language={"zh": {"positive": "好"}}),
            "prompts.short.tags_by_language.zh",
            "missing label(s) 'negative'",
        ),
        (dict(CHAT, prompts={}), "prompts", "at least one prompt"),
        (dict(CHAT, labels=["a", "b"]), "labels", "a field of a choice role, not of a chat role"),
    ],
)
def test_a_bad_chat_role_is_refused(tmp_path, data, field, message):
    path = write(tmp_path / "talk.json", data)
    assert refused(path, message).startswith(f"{path}: {field}: ")


# --- checks across the registry -----------------------------------------------------------------


def test_reads_must_name_an_existing_choice_role(tmp_path):
    path = write(tmp_path / "roles" / "x.json", choice(reads="nothing"))
    with pytest.raises(RoleError, match=rf"^{re.escape(str(path))}: reads: no role 'nothing'; roles: "):
        RoleRegistry.discover(tmp_path)
    write(path, choice(reads="chat"))
    with pytest.raises(RoleError, match=rf"^{re.escape(str(path))}: reads: 'chat' is a chat role"):
        RoleRegistry.discover(tmp_path)
    write(path, choice(reads="emotion"))  # emotion reads sentiment: name sentiment instead
    with pytest.raises(RoleError, match=rf"^{re.escape(str(path))}: reads: 'emotion' reads 'sentiment'"):
        RoleRegistry.discover(tmp_path)


def test_chat_tags_must_cover_the_mood_roles_labels(tmp_path):
    path = write(tmp_path / "talk.json", chat_prompt(tags={"positive": "good"}, examples=[]))
    with pytest.raises(RoleError, match=rf"^{re.escape(str(path))}: prompts\.short\.tags: .* missing 'negative'"):
        RoleRegistry.discover(None, [path])
    # Replacing sentiment with other labels breaks the built-in chat role, and the error says where.
    write(tmp_path / "roles" / "sentiment.json", choice(name="sentiment"))
    with pytest.raises(RoleError, match=r"^builtin chat\.json: prompts\.original\.tags: .*roles/sentiment\.json"):
        RoleRegistry.discover(tmp_path)


# --- inline roles -------------------------------------------------------------------------------


def test_an_inline_role():
    role = parse_inline_role(choice())
    assert role.source == "request" and role.label_names == ("happy", "sad")


@pytest.mark.parametrize(
    "data, message",
    [
        (choice(examples=[{"text": "x" * MAX_INLINE_BYTES, "label": "happy"}]), "an inline role may have at most"),
        (choice(labels=labels(51), prompts=None, examples=None), "labels: 51 label(s); an inline role has 2 to 50"),
        (choice(examples=[{"text": "x", "label": "happy"}] * 201), "examples: 201 items; an inline role"),
        (CHAT, "kind: an inline role must be of kind choice"),
        ("text", "a role is a JSON object"),
    ],
)
def test_a_bad_inline_role_is_refused(data, message):
    with pytest.raises(RoleError) as caught:
        parse_inline_role(data)
    assert str(caught.value).startswith("request: ") and message in str(caught.value)


# --- the parsed role ----------------------------------------------------------------------------


def test_defaults_and_lookups():
    role = parse_role(choice(prompts=None), "t")
    assert role.title == {"zh": "mood", "en": "mood"}
    assert role.instruction == {"en": "Which mood?"}
    assert parse_role(choice(instruction="哪种情绪?"), "t").instruction == {"zh": "哪种情绪?"}
    assert role.prompt() is None and role.default_prompt is None
    assert role.label("sad").description == "feeling down"
    with pytest.raises(RoleError, match="unknown label 'x'; labels: 'happy', 'sad'"):
        role.label("x")
    with pytest.raises(RoleError, match="unknown prompt 'x'"):
        role.prompt("x")
    assert parse_role(choice(title={"en": "Mood"}), "t").title == {"zh": "Mood", "en": "Mood"}


def test_label_shown_falls_back():
    assert Label("joy", display={"zh": "喜悦", "en": "Joy"}).shown("en") == "Joy"
    assert Label("joy", display={"en": "Joy"}).shown("zh") == "Joy"
    assert Label("joy").shown() == "joy"


def test_fingerprint_follows_what_the_model_sees():
    base = parse_role(choice(), "a").fingerprint()
    assert parse_role(choice(), "elsewhere").fingerprint() == base
    shown_only = choice(title={"zh": "心情", "en": "Mood"}, description="Another description.")
    shown_only["labels"][1] = dict(shown_only["labels"][1], emoji="😭", display={"zh": "难过"})
    assert parse_role(shown_only, "a").fingerprint() == base
    described = choice()
    described["labels"][1] = dict(described["labels"][1], description="feeling low")
    assert parse_role(described, "a").fingerprint() != base
    assert parse_role(choice(examples=[]), "a").fingerprint() != base


def extract(**changes) -> dict:
    role = {
        "name": "tags",
        "kind": "extract",
        "description": "Key phrases.",
        "instruction": "List the key phrases.",
        "examples": [{"text": "The bike lane on Maple Street opened.", "phrases": ["bike lane", "Maple Street"]}],
    }
    return {k: v for k, v in {**role, **changes}.items() if v is not None}


def test_an_extract_role_is_read_with_its_examples_and_phrase_limit(tmp_path):
    role = load_role_file(write(tmp_path / "tags.json", extract(max_phrases=5)))
    assert role.kind == "extract" and role.max_phrases == 5 and role.labels == ()
    assert role.examples[0].phrases == ("bike lane", "Maple Street")
    assert load_role_file(write(tmp_path / "t2.json", extract())).max_phrases == 10  # the default


@pytest.mark.parametrize(
    "changes,field,message",
    [
        (
            {"examples": [{"text": "The bike lane opened.", "phrases": ["bus lane"]}]},
            "examples[0].phrases[0]",
            "'bus lane' does not occur in the example's text",
        ),
        ({"examples": [{"text": "The bike lane opened.", "phrases": []}]}, "examples[0].phrases", "at least one"),
        ({"max_phrases": 0}, "max_phrases", "from 1 to 50"),
        ({"max_phrases": True}, "max_phrases", "from 1 to 50"),
        ({"instruction": None}, "instruction", "required"),
        ({"labels": ["a", "b"]}, "labels", "a field of a choice role, not of an extract role"),
    ],
)
def test_a_bad_extract_role_is_named_with_its_field(tmp_path, changes, field, message):
    with pytest.raises(RoleError) as caught:
        load_role_file(write(tmp_path / "tags.json", extract(**changes)))
    assert f"tags.json: {field}: " in str(caught.value) and message in str(caught.value)
