"""Chat template rendering, checked against transformers' own chat template rendering."""

from __future__ import annotations

import numpy as np
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from omni_runtime.prompt.chat import DEFAULT_SYSTEM_PROMPT, ChatTemplate, build_messages
from omni_runtime.errors import BundleError, InputError

# The Qwen2.5-Omni chat template (tokenizer_config.json / chat_template.jinja of the checkpoint).
QWEN_OMNI_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def transformers_render(template, messages, add_generation_prompt=True, **kwargs):
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return rendered[0]


CONVERSATIONS = {
    "default system": build_messages("What is the capital of France?"),
    "no system": build_messages("Hello", system=None),
    "custom system": build_messages("Hello", system="You are terse."),
    "media": build_messages(
        "Describe these.",
        content=[
            {"type": "audio", "audio": "cough.wav"},
            {"type": "image", "image": "cat.png"},
            {"type": "video", "video": "clip.mp4"},
            {"type": "audio", "audio": np.zeros(16000, dtype=np.float32)},
        ],
    ),
    "media only": build_messages(content=[{"type": "audio", "audio": np.zeros(10, dtype=np.float32)}]),
    "multi turn": [
        {"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]},
        {"role": "user", "content": "Hi <b>there</b> & ünïcode"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": "x"}, {"type": "text", "text": "And?"}]},
    ],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize(
    "options",
    [{}, {"add_generation_prompt": False}, {"add_audio_id": True, "add_vision_id": True}],
    ids=["generation prompt", "no generation prompt", "media ids"],
)
def test_matches_transformers(name, options):
    messages = CONVERSATIONS[name]
    assert ChatTemplate(QWEN_OMNI_TEMPLATE).render(messages, **options) == transformers_render(
        QWEN_OMNI_TEMPLATE, messages, **options
    )


def test_known_rendering():
    text = ChatTemplate(QWEN_OMNI_TEMPLATE).render(build_messages("Hi", content=[{"type": "audio", "audio": "a"}]))
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ChatTemplate(QWEN_OMNI_TEMPLATE).render(build_messages("Hi", system=None)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_environment_matches_transformers():
    # tojson without HTML escaping, raise_exception, namespace, dict, loop controls, trim/lstrip
    template = (
        "{% for m in messages %}\n"
        "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "  {{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=True) }}\n"
        "{% endfor %}\n"
        "{% set ns = namespace(n=0) %}{% set ns.n = 3 %}{{ ns.n }} {{ dict(a=1) | tojson }}"
        "{% generation %}gen{% endgeneration %}"
        "{{ tools is none }}{{ documents is none }}"
    )
    messages = [{"role": "user", "content": "<b>é</b> & \"q\""}, {"role": "assistant", "content": "x"}, {"r": 3}]
    assert ChatTemplate(template).render(messages) == transformers_render(template, messages)


def test_raise_exception_is_input_error():
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(InputError, match="System role not supported"):
        ChatTemplate(template).render(build_messages("Hi"))
    with pytest.raises(Exception, match="System role not supported"):
        transformers_render(template, build_messages("Hi"))


def test_sandbox_blocks_unsafe_access():
    with pytest.raises(InputError):
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render([])
    template = "{{ messages[1]['content'][0]['audio'] }}{{ messages[1]['content'][0]['audio'].tofile }}"
    messages = build_messages(content=[{"type": "audio", "audio": np.zeros(2, np.float32)}])
    assert ChatTemplate(template).render(messages) == "<ndarray>"  # a plain string: no tofile


def test_syntax_error_is_bundle_error(tmp_path):
    path = tmp_path / "chat_template.jinja"
    path.write_text("{% for m in messages %}", encoding="utf-8")
    with pytest.raises(BundleError) as info:
        ChatTemplate.from_file(path)
    assert str(path) in str(info.value) and "fix:" in str(info.value)


def test_from_file(tmp_path):
    path = tmp_path / "chat_template.jinja"
    path.write_text(QWEN_OMNI_TEMPLATE, encoding="utf-8")
    messages = build_messages("Hi")
    assert ChatTemplate.from_file(path).render(messages) == transformers_render(QWEN_OMNI_TEMPLATE, messages)
    with pytest.raises(BundleError, match="cannot read"):
        ChatTemplate.from_file(tmp_path / "missing.jinja")


def test_build_messages_format():
    assert build_messages("Hi", content=[{"type": "image", "image": "cat.png"}]) == [
        {"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "Hi"}]},
    ]
    assert build_messages("Hi", system=None) == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


@pytest.mark.parametrize(
    "kwargs",
    [{"prompt": ""}, {"prompt": "  \n"}, {}, {"prompt": None, "content": []}, {"prompt": 3},
     {"prompt": "Hi", "content": [{"type": "smell"}]}, {"prompt": "Hi", "content": ["text"]}],
)
def test_invalid_input(kwargs):
    with pytest.raises(InputError) as info:
        build_messages(**kwargs)
    assert "fix:" in str(info.value)
