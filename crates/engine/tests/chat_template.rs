//! Chat templates: SmolLM2's real template, the ChatML fallback, Hugging Face
//! extensions and error reporting.

// Helpers outside `#[test]` functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

mod common;

use afo_engine::{CHATML_TEMPLATE, ChatTemplate, Message};

use common::smollm2_tokenizer as smollm2;

#[test]
fn smollm2_template_renders_chatml() {
    let tok = smollm2();
    let template = ChatTemplate::from_tokenizer(&tok).unwrap();
    let messages = [
        Message::system("You are terse."),
        Message::user("What is the capital of France?"),
    ];
    let text = template.render(&messages, true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are terse.<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // The rendered prompt tokenizes with the control tokens kept whole.
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 2);
}

#[test]
fn smollm2_template_adds_its_default_system_prompt() {
    let tok = smollm2();
    let template = ChatTemplate::from_tokenizer(&tok).unwrap();
    let text = template.render(&[Message::user("Hi")], false).unwrap();
    assert!(
        text.starts_with("<|im_start|>system\n") && text.contains("SmolLM"),
        "{text}"
    );
    assert!(text.ends_with("<|im_start|>user\nHi<|im_end|>\n"), "{text}");
}

#[test]
fn chatml_fallback() {
    let template = ChatTemplate::chatml("", "<|im_end|>").unwrap();
    let text = template
        .render(&[Message::user("a"), Message::assistant("b")], false)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    );
    assert!(CHATML_TEMPLATE.contains("<|im_start|>"));
}

#[test]
fn huggingface_extensions() {
    // Python string methods, loop controls, bos_token, tojson and strftime_now.
    let source = "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
                  {{ m.role.upper() }}:{{ m.content.strip() }}|{% endfor %}\
                  {{ {'a': 1, 'b': [1, 2], 'c': '<é>'} | tojson }}|{{ strftime_now('%Y') | length }}";
    let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
    let text = template
        .render(
            &[
                Message::user("  one "),
                Message::assistant("two"),
                Message::user("three"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        text,
        "<s>USER:one|ASSISTANT:two|{\"a\": 1, \"b\": [1, 2], \"c\": \"<é>\"}|4"
    );
}

#[test]
fn trim_and_lstrip_blocks_as_transformers() {
    let source = "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}";
    let template = ChatTemplate::new(source, "", "").unwrap();
    let text = template
        .render(&[Message::user("x"), Message::user("y")], false)
        .unwrap();
    assert_eq!(text, "    x\n    y\n");
}

#[test]
fn raise_exception_is_an_error() {
    let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}ok";
    let template = ChatTemplate::new(source, "", "").unwrap();
    assert_eq!(template.render(&[Message::user("x")], false).unwrap(), "ok");
    let err = template
        .render(&[Message::assistant("x")], false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Conversation must start with a user message"),
        "{err}"
    );
}

#[test]
fn syntax_errors_are_errors_not_panics() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", "", "")
        .unwrap_err()
        .to_string();
    assert!(err.contains("chat template `default`"), "{err}");
    let template = ChatTemplate::new("{{ messages[0].content | nosuchfilter }}", "", "");
    match template {
        Err(e) => assert!(e.to_string().contains("nosuchfilter"), "{e}"),
        Ok(t) => {
            let e = t.render(&[Message::user("x")], false).unwrap_err();
            assert!(e.to_string().contains("nosuchfilter"), "{e}");
        }
    }
}

#[test]
fn extra_variables_reach_the_template() {
    let source = "{% if tools %}{{ tools | length }} tools{% endif %}";
    let template = ChatTemplate::new(source, "", "").unwrap();
    let tools = serde_json::json!([{"name": "search"}, {"name": "calc"}]);
    let text = template
        .render_with(
            &[Message::user("x")],
            false,
            minijinja::context! { tools => minijinja::Value::from_serialize(&tools) },
        )
        .unwrap();
    assert_eq!(text, "2 tools");

    // Extra variables cannot replace the conversation.
    let template = ChatTemplate::new("{{ messages | length }}", "", "").unwrap();
    let text = template
        .render_with(
            &[Message::user("x")],
            false,
            minijinja::context! { messages => vec![1, 2, 3] },
        )
        .unwrap();
    assert_eq!(text, "1");
}
