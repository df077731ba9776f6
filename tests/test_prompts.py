import pytest

from rlhf.data.prompts import PromptEncoder, PromptFormat

POST = {"input_text": "My dog barks at night and the neighbours complained twice. What should I do? [summary]: "}


def test_chat_template_wraps_instruction_then_input(tiny_tokenizer):
    encoder = PromptEncoder(tiny_tokenizer, PromptFormat(instruction="Summarize in less than 50 words."))
    assert encoder.render(POST) == (
        "<|im_start|>user\nSummarize in less than 50 words.\n" + POST["input_text"] + "<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_plain_text_can_be_forced(tiny_tokenizer):
    encoder = PromptEncoder(tiny_tokenizer, PromptFormat(instruction="Summarize.", use_chat_template=False))
    assert encoder.render(POST) == "Summarize.\n" + POST["input_text"]
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    assert encoder.render(chat) == "System: Be brief.\n\nUser: Summarize.\nHi\n\nAssistant:"


def test_instruction_goes_before_the_last_user_turn_of_a_chat(tiny_tokenizer):
    chat = {"messages": [{"role": "user", "content": "First"}, {"role": "assistant", "content": "Ok"},
                         {"role": "user", "content": "Second"}]}
    messages = PromptEncoder(tiny_tokenizer, PromptFormat(instruction="Be kind.")).messages(chat)
    assert [m["content"] for m in messages] == ["First", "Ok", "Be kind.\nSecond"]
    assert chat["messages"][-1]["content"] == "Second"


def test_forcing_a_missing_chat_template_is_an_error(tiny_tokenizer):
    import copy

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    assert PromptEncoder(plain).render(POST) == POST["input_text"]
    with pytest.raises(ValueError, match="no chat template"):
        PromptEncoder(plain, PromptFormat(use_chat_template=True)).render(POST)


def test_long_prompt_is_cut_inside_the_input_keeping_both_ends(tiny_tokenizer):
    long_post = {"input_text": "word " * 400 + "[summary]: "}
    encoder = PromptEncoder(tiny_tokenizer, PromptFormat(instruction="Summarize."), prompt_sequence_length=64)
    full_length = len(tiny_tokenizer(encoder.render(long_post), add_special_tokens=False)["input_ids"])
    ids = encoder.encode_prompt(long_post)
    assert len(ids) <= 64
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nSummarize.\nword word")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert encoder.counts.prompts == 1 and encoder.counts.prompts_truncated == 1
    assert encoder.counts.prompt_tokens_dropped == full_length - len(ids)

    short = encoder.encode_prompt(POST)
    assert tiny_tokenizer.decode(short) == encoder.render(POST)
    assert encoder.counts.prompts == 2 and encoder.counts.prompts_truncated == 1


def test_a_length_too_short_for_the_template_is_a_clear_error(tiny_tokenizer):
    encoder = PromptEncoder(tiny_tokenizer, PromptFormat(instruction="A long instruction " * 10),
                            prompt_sequence_length=8)
    with pytest.raises(ValueError, match="leaves no room for the input"):
        encoder.encode_prompt(POST)


def test_completions_end_with_eos_or_are_cut_without_it(tiny_tokenizer):
    encoder = PromptEncoder(tiny_tokenizer, target_sequence_length=12)
    short = encoder.encode_completion("Dog barks.")
    assert short[-1] == tiny_tokenizer.eos_token_id
    cut = encoder.encode_completion("The dog barks every single night and the neighbours are angry about it.")
    assert len(cut) == 12 and tiny_tokenizer.eos_token_id not in cut
    assert encoder.counts.completions == 2 and encoder.counts.completions_truncated == 1
    assert encoder.counts.completion_tokens_dropped > 0


def test_sequence_lengths_must_be_positive(tiny_tokenizer):
    with pytest.raises(ValueError, match="prompt_sequence_length"):
        PromptEncoder(tiny_tokenizer, prompt_sequence_length=0)
