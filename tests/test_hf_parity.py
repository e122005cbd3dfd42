"""Hugging Face parity: BertForSequenceClassification + BertForTokenClassification sharing
one encoder give the same summed loss and gradients as that encoder + MultiTaskHeads; a
causal LM's tied output head gives its own loss and gradients through multitask_loss."""

import pytest
import torch
from oracle import rel_error

from mtlfast import MultiTaskHeads, Task

transformers = pytest.importorskip("transformers")


def _models():
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=53,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(torch.seed() % 2**31)
    base = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    seq_model = transformers.BertForSequenceClassification(transformers.BertConfig(**base, num_labels=3))
    tok_model = transformers.BertForTokenClassification(transformers.BertConfig(**base, num_labels=5))
    tok_model.bert.load_state_dict(seq_model.bert.state_dict(), strict=False)
    return seq_model.eval(), tok_model.eval()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_matches_hf_heads(backend):
    seq_model, tok_model = _models()
    B, S = 4, 11
    input_ids = torch.randint(0, 97, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    y_seq = torch.randint(0, 3, (B,))
    y_tok = torch.randint(0, 5, (B, S)).masked_fill(mask == 0, -100)

    hf_loss = seq_model(input_ids, attention_mask=mask, labels=y_seq).loss
    hf_loss = hf_loss + tok_model(input_ids, attention_mask=mask, labels=y_tok).loss
    hf_loss.backward()

    tasks = [Task("cls", 3, "cross_entropy"), Task("tok", 5, "cross_entropy", level="token")]
    encoder = seq_model.bert
    encoder_copy = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    hf_encoder_grads = {}
    for name, p in encoder.named_parameters():
        tok_param = dict(tok_model.bert.named_parameters()).get(name)
        tok_grad = tok_param.grad if tok_param is not None and tok_param.grad is not None else 0
        hf_encoder_grads[name] = p.grad.clone() + tok_grad
        p.grad = None
    heads = MultiTaskHeads.from_linears(tasks, {"cls": seq_model.classifier, "tok": tok_model.classifier},
                                        backend=backend)  # fmt: skip
    outputs = encoder(input_ids, attention_mask=mask)
    out = heads(outputs.last_hidden_state, {"cls": y_seq, "tok": y_tok}, attention_mask=mask,
                pooled=outputs.pooler_output)  # fmt: skip
    out.loss.backward()

    assert rel_error(out.loss, hf_loss) < 1e-4
    assert rel_error(heads.weight.grad[:3], seq_model.classifier.weight.grad) < 1e-4
    assert rel_error(heads.weight.grad[3:], tok_model.classifier.weight.grad) < 1e-4
    assert rel_error(heads.bias.grad[3:], tok_model.classifier.bias.grad) < 1e-4
    names = [name for name, _ in encoder.named_parameters()]
    ours = torch.cat([p.grad.flatten() for p in encoder.parameters()])
    theirs = torch.cat([hf_encoder_grads[name].flatten() for name in names])
    assert rel_error(ours, theirs) < 1e-4
    scale = theirs.norm()
    for name, p in encoder.named_parameters():
        assert torch.equal(p, encoder_copy[name])
        # Per parameter, relative to its own norm unless that gradient is zero in exact
        # arithmetic (the attention key bias: softmax is shift invariant).
        floor = max(hf_encoder_grads[name].norm(), 1e-6 * scale)
        assert (p.grad - hf_encoder_grads[name]).norm() <= 1e-4 * floor, name


def _check_causal_lm_head(model, body, task: Task, input_ids, attention_mask, labels, backend: str) -> None:
    """``model``'s own output head (``model.lm_head``, no bias) as the vocabulary ``task`` of a
    functional call on ``body``'s hidden states, fed HF's labels shifted by one: the loss and
    every gradient of ``model(labels=...)``, a tied input embedding's included."""
    import torch.nn.functional as F

    from mtlfast import multitask_loss

    hf_loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    hf_loss.backward()
    hf_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    hidden = body(input_ids, attention_mask=attention_mask).last_hidden_state
    next_tokens = F.pad(labels[:, 1:], (0, 1), value=-100)
    out = multitask_loss(hidden, model.lm_head.weight, None, [task], {"lm": next_tokens}, backend=backend)
    out.loss.backward()
    assert rel_error(out.loss, hf_loss) < 1e-5
    for name, p in model.named_parameters():
        assert rel_error(p.grad, hf_grads[name]) < 1e-4, name


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_causal_lm_head_through_the_functional_call(backend):
    """GPT-2's output head, tied to its input embedding, through the functional call."""
    config = transformers.GPT2Config(vocab_size=211, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(torch.seed() % 2**31)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.bias is None
    input_ids = torch.randint(0, 211, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    _check_causal_lm_head(model, model.transformer, Task("lm", 211, "cross_entropy", level="token"), input_ids, mask,
                          labels, backend)  # fmt: skip


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_decoder_classifier_with_last_token_pooling(backend, padding_side):
    """A decoder's sequence classifier (GPT2ForSequenceClassification: a bias-free score head
    on the last non-pad token) as heads built with ``bias=False`` and ``pooled=last_token(...)``:
    its loss and every gradient, with right or left padding."""
    from mtlfast import last_token

    config = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, num_labels=4, pad_token_id=0)  # fmt: skip
    torch.manual_seed(torch.seed() % 2**31)
    model = transformers.GPT2ForSequenceClassification(config).eval()
    input_ids = torch.randint(1, 101, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    for row, length in ((1, 7), (3, 2)):
        padded = slice(length, None) if padding_side == "right" else slice(None, 12 - length)
        mask[row, padded] = 0
        input_ids[row, padded] = 0
    labels = torch.randint(0, 4, (4,))

    hf_loss = model(input_ids, attention_mask=mask, labels=labels).loss
    hf_loss.backward()
    hf_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    heads = MultiTaskHeads.from_linears([Task("cls", 4, "cross_entropy")], {"cls": model.score}, bias=False,
                                        backend=backend)  # fmt: skip
    hidden = model.transformer(input_ids, attention_mask=mask).last_hidden_state
    out = heads(hidden, {"cls": labels}, pooled=last_token(hidden, mask))
    out.loss.backward()
    assert rel_error(out.loss, hf_loss) < 1e-5
    assert rel_error(heads.weight.grad, hf_grads["score.weight"]) < 1e-4
    for name, p in model.transformer.named_parameters():
        assert rel_error(p.grad, hf_grads[f"transformer.{name}"]) < 1e-4, name


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_softcapped_lm_head_matches_gemma2(backend):
    """Gemma 2 caps its language-model logits (``final_logit_softcapping``): its tied output
    head as a vocabulary task with ``softcap``."""
    config = transformers.Gemma2Config(vocab_size=173, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       max_position_embeddings=32, final_logit_softcapping=3.0,
                                       attn_implementation="eager", pad_token_id=0)  # fmt: skip
    torch.manual_seed(torch.seed() % 2**31)
    model = transformers.Gemma2ForCausalLM(config).eval()
    input_ids = torch.randint(1, 173, (2, 11))
    labels = input_ids.clone()
    labels[1, 8:] = -100
    task = Task("lm", 173, "cross_entropy", level="token", softcap=3.0)
    _check_causal_lm_head(model, model.model, task, input_ids, None, labels, backend)
