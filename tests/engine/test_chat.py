"""Chat templates: the model's own (GGUF) template vs transformers' apply_chat_template, and the named formats."""
from __future__ import annotations

import gguf
import pytest
from jinja2.exceptions import TemplateError

from conftest import smollm2_gguf
from sot_engine.engine.chat import VICUNA_SYSTEM, ChatTemplate, guess_chat_template

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke 🤖\nwith two lines"}],
]


@pytest.fixture(scope="module")
def smol():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("embedded model not installed")
    from transformers import AutoTokenizer
    reader = gguf.GGUFReader(path)
    src = reader.fields["tokenizer.chat_template"].contents()
    return ChatTemplate(src, bos_token="<|im_start|>", eos_token="<|im_end|>"), \
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_smollm2_template_exact(smol):
    tpl, _ = smol
    assert tpl.render([{"role": "user", "content": "Hi"}]) == \
        SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    prefill = tpl.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "1."}])
    assert prefill == SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n1."


def test_smollm2_matches_transformers(smol):
    tpl, ref = smol
    for conv in CONVERSATIONS:
        for gen in (True, False):
            assert tpl.render(conv, add_generation_prompt=gen) == \
                ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen), conv
        prefill = conv + [{"role": "assistant", "content": "Sure:\n1."}]
        assert tpl.render(prefill) == ref.apply_chat_template(prefill, tokenize=False, continue_final_message=True)


def test_chatml():
    tpl = ChatTemplate.named("chatml")
    assert tpl.render(CONVERSATIONS[1]) == \
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tpl.render(CONVERSATIONS[0], add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert tpl.render(CONVERSATIONS[0] + [{"role": "assistant", "content": "1."}]).endswith(
        "<|im_start|>assistant\n1.")


def test_vicuna():
    """FastChat's vicuna_v1.1 (sep " ", sep2 "</s>"), with the LLaMA BOS in front."""
    tpl = ChatTemplate.named("vicuna_v1.1")
    assert VICUNA_SYSTEM.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert tpl.render([{"role": "user", "content": "Hi"}]) == f"<s>{VICUNA_SYSTEM} USER: Hi ASSISTANT:"
    assert tpl.render(CONVERSATIONS[2]) == (f"<s>{VICUNA_SYSTEM} USER: Hi ASSISTANT: Hello! How can I help?</s>"
                                            "USER: Tell me a joke 🤖\nwith two lines ASSISTANT:")
    assert tpl.render(CONVERSATIONS[1]) == "<s>Be terse. USER: 2+2? ASSISTANT:"
    # prefill keeps the template's own space after "ASSISTANT:", and no </s>
    assert tpl.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "1."}]) == \
        f"<s>{VICUNA_SYSTEM} USER: Hi ASSISTANT: 1."
    assert ChatTemplate.named("vicuna_v1.1", bos_token="").render(CONVERSATIONS[0]).startswith("A chat between")


def test_llama2():
    tpl = ChatTemplate.named("llama-2")
    assert tpl.render(CONVERSATIONS[1]) == "<s>[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\n2+2? [/INST]"
    assert tpl.render(CONVERSATIONS[2]) == ("<s>[INST] Hi [/INST] Hello! How can I help? </s>"
                                            "<s>[INST] Tell me a joke 🤖\nwith two lines [/INST]")
    assert tpl.render(CONVERSATIONS[0] + [{"role": "assistant", "content": "Sure"}]) == "<s>[INST] Hi [/INST] Sure"
    with pytest.raises(TemplateError, match="alternate"):
        tpl.render([{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}])


def test_llama2_matches_meta_template():
    """Same output as the template in Meta's Llama-2-chat tokenizer_config.json."""
    meta = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
            "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
            "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if loop.index0 == 0 and system_message != false %}"
            "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
            "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
            "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
            "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
    ours, ref = ChatTemplate.named("llama-2"), ChatTemplate(meta, bos_token="<s>", eos_token="</s>")
    for conv in CONVERSATIONS + [[{"role": "system", "content": " padded "}, {"role": "user", "content": " q "}]]:
        assert ours.render(conv) == ref.render(conv)


def test_guess_and_errors():
    assert guess_chat_template("lmsys/vicuna-7b-v1.5").name == "vicuna_v1.1"
    assert guess_chat_template("/models/Llama-2-7b-chat-hf").name == "llama-2"
    assert guess_chat_template("/models/llama2_13b_chat").name == "llama-2"
    assert guess_chat_template("some-model").name == "chatml"
    assert guess_chat_template("Gemma 3 270m gemma-3-270m-q4_k_m.gguf", "<bos>", "<eos>").name == "gemma"


def test_gemma_template_is_googles():
    """Gemma 3's own chat template (its tokenizer_config.json), written out: the system prompt opens the first user
    turn, the assistant is "model", contents are trimmed."""
    tpl = ChatTemplate.named("gemma")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Colors?"}]
    assert tpl.render(msgs) == ("<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\n"
                                "Hello.<end_of_turn>\n<start_of_turn>user\nColors?<end_of_turn>\n"
                                "<start_of_turn>model\n")
    assert tpl.render(msgs[1:2]) == "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(ValueError, match="unknown chat template 'nope'"):
        ChatTemplate.named("nope")
    tpl = ChatTemplate("{{ raise_exception('no ' + messages[0]['role']) }}")
    with pytest.raises(TemplateError, match="no user"):
        tpl.render(CONVERSATIONS[0])
    tj = ChatTemplate("{{ messages | tojson }}{{ bos_token }}", bos_token="<B>")
    assert tj.render([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]<B>'
