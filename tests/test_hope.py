"""examples/hope: HOPE model, Transformer++ baseline, training script (tiny sizes, CPU)."""
import dataclasses
import json
import math
import os

import pytest
import torch

from examples.hope import model as hm

torch.set_num_threads(1)


def tiny(**kw):
    base = dict(vocab_size=17, block_size=32, n_layer=2, n_embd=16, n_head=2, memory_hidden=8,
                chunk_size=4, gen_chunk_size=8, cms=True, cms_periods=(1, 2), cms_hidden=24)
    base.update(kw)
    if base.get("memory") == "mlp":       # MLP memories have no anchor gate (as train.py's default)
        base.setdefault("anchor_init", None)
    return hm.HopeConfig(**base)


VARIANTS = [dict(), dict(memory="mlp"), dict(self_modifying=False), dict(cms=False),
            dict(memory="mlp", objective="dot", self_modifying=False), dict(inner_momentum=0.9),
            dict(inner_momentum=0.5, self_modifying=False), dict(inner_momentum=0.9, inner_momentum_ema=True),
            dict(anchor_init=None), dict(anchor_init=0.5, self_modifying=False, inner_momentum=0.5)]


def _models():
    torch.manual_seed(0)
    out = [hm.HOPE(tiny(**kw)).double() for kw in VARIANTS]
    out.append(hm.Transformer(hm.matched_transformer_config(tiny())).double())
    return out


@pytest.mark.parametrize("i", range(len(VARIANTS) + 1))
def test_causality(i):
    m = _models()[i]
    x = torch.randint(0, 17, (2, 29))
    y = m(x)[0]
    for t in (0, 7, 15, 28):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randint(0, 17, x2[:, t + 1:].shape)
        torch.testing.assert_close(m(x2)[0][:, :t + 1], y[:, :t + 1], rtol=1e-12, atol=1e-12)
        if t < 28:
            assert not torch.allclose(m(x2)[0][:, t + 1:], y[:, t + 1:])


@pytest.mark.parametrize("memory", ["linear", "mlp", "linear+momentum", "linear+anchor"])
@pytest.mark.parametrize("c", [1, 4, 16])
def test_model_chunked_equals_chunk_start_loop(memory, c, monkeypatch):
    """The model's chunk-wise memories equal the per-token chunk-start loop."""
    from deepopt import memory as memory_rules
    torch.manual_seed(1)
    kind, extra = memory.split("+")[0], (memory.split("+") + [""])[1]
    m = hm.HOPE(tiny(memory=kind, chunk_size=c, gen_chunk_size=16, inner_momentum=0.9 if extra == "momentum" else 0.0,
                     anchor_init=0.9 if extra == "anchor" else None)).double()
    memory = memory_rules
    x = torch.randint(0, 17, (2, 32))
    fast = m(x)[0]
    monkeypatch.setattr(hm, "linear_memory_write", memory.linear_memory_reference)
    monkeypatch.setattr(hm, "mlp_memory_write", memory.mlp_memory_reference)
    slow = m(x)[0]
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)


def test_streaming_state_equals_full_sequence():
    torch.manual_seed(2)
    for kw in (dict(), dict(memory="mlp"), dict(anchor_init=None)):
        m = hm.HOPE(tiny(**kw)).double()
        x = torch.randint(0, 17, (2, 32))
        full = m(x)[0]
        a, _, st = m(x[:, :16], return_state=True)
        b, _, _ = m(x[:, 16:], state=hm.detach_state(st), return_state=True)
        torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", [dict(), dict(memory="mlp"), dict(inner_momentum=0.9)])
def test_a_state_saved_mid_document_resumes(kw, tmp_path):
    """A checkpoint of the memory state taken mid-document, reloaded, continues as one long call."""
    torch.manual_seed(4)
    m = hm.HOPE(tiny(**kw)).double()
    x = torch.randint(0, 17, (2, 40))
    full = m(x)[0]
    a, _, st = m(x[:, :24], return_state=True)
    torch.save(hm.detach_state(st), tmp_path / "state.pt")
    b = m(x[:, 24:], state=torch.load(tmp_path / "state.pt"))[0]
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-10)


def test_a_state_of_another_batch_dtype_or_model_names_both_shapes():
    torch.manual_seed(5)
    m = hm.HOPE(tiny())
    _, _, st = m(torch.randint(0, 17, (2, 8)), return_state=True)
    with pytest.raises(ValueError, match=r"'conv': shape \(2, 3, 16\) does not match this model at batch size 3: "
                                         r"expected \(3, 3, 16\)|shape \(2, .*expected \(3, "):
        m(torch.randint(0, 17, (3, 8)), state=st)
    with pytest.raises(ValueError, match="dtype torch.float64 does not match the model's torch.float32"):
        m(torch.randint(0, 17, (2, 8)), state=[{k: (v.double() if torch.is_tensor(v) else v) for k, v in b.items()}
                                              for b in st])
    other = hm.HOPE(tiny(memory="mlp"))
    with pytest.raises(ValueError, match="keys .* do not match this model's"):
        other(torch.randint(0, 17, (2, 8)), state=st)
    with pytest.raises(ValueError, match="expected a list of 2 block states"):
        m(torch.randint(0, 17, (2, 8)), state=st[:1])
    wider = hm.HOPE(tiny(n_embd=32))
    with pytest.raises(ValueError, match=r"shape \(2, .*\) does not match this model at batch size 2: expected"):
        wider(torch.randint(0, 17, (2, 8)), state=st)


def test_stream_batches_continue_each_row_and_restart_at_resets():
    from examples.data import StreamBatches
    data = torch.arange(1000)
    stream = StreamBatches(data, 4, 16, torch.Generator().manual_seed(0), reset_prob=0.3)
    x, y, reset = stream.next()
    assert reset.all() and torch.equal(y, x + 1)   # every row starts fresh; targets are the next tokens
    for _ in range(30):
        before = stream.cursor.clone()
        x, y, reset = stream.next()
        assert torch.equal(x[~reset, 0], before[~reset]) and torch.equal(y, x + 1)
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.long))   # windows are contiguous
    saved = stream.state_dict()
    again = StreamBatches(data, 4, 16, torch.Generator().manual_seed(0))
    again.load_state_dict(saved)
    assert torch.equal(again.cursor, stream.cursor)
    with pytest.raises(ValueError, match="reset_prob must lie in"):
        StreamBatches(data, 4, 16, None, reset_prob=1.5)


@pytest.mark.parametrize("kw", [dict(), dict(memory="mlp"), dict(inner_momentum=0.9)])
def test_reset_state_restores_the_initial_memory_of_the_reset_rows_only(kw):
    torch.manual_seed(6)
    m = hm.HOPE(tiny(**kw)).double()
    x = torch.randint(0, 17, (3, 16))
    _, _, st = m(x, return_state=True)
    rows = torch.tensor([True, False, True])
    out = hm.reset_state(m, st, rows)
    fresh = m(x[:, 8:])[0]
    carried = m(x[:, 8:], state=st)[0]
    mixed = m(x[:, 8:], state=out)[0]
    torch.testing.assert_close(mixed[rows], fresh[rows], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixed[~rows], carried[~rows], rtol=1e-12, atol=1e-12)


def test_steady_state_training_carries_the_memory_and_resumes(tmp_path, monkeypatch):
    """--carry-state --tbptt-segments 2 --reset-prob: trains, records its options, and a run cut
    by Ctrl-C mid-stream resumes with its streams and carried memory: the same history as one run."""
    import signal

    from examples.data import StreamBatches
    from examples.hope import train
    previous = signal.getsignal(signal.SIGINT)
    path = _corpus(tmp_path)
    base = ["--preset", "tiny", "--data", str(path), "--model", "hope", "--optimizer", "adamw", "--lr", "1e-2",
            "--steps", "30", "--sample-chars", "0", "--quiet", "--device", "cpu", "--carry-state",
            "--tbptt-segments", "2", "--reset-prob", "0.25"]
    whole = train.main(base + ["--out", str(tmp_path / "whole")])["models"]["hope"]
    assert whole["carry_state"] and whole["tbptt_segments"] == 2 and whole["reset_prob"] == 0.25
    assert whole["history"][-1]["train_loss"] < whole["first_loss"] - 0.3
    assert whole["history"][-1]["tokens"] == 30 * whole["batch_size"] * whole["seq_len"] * 2
    calls = {"n": 0}
    real_next = StreamBatches.next

    def interrupting_next(self):
        calls["n"] += 1
        if calls["n"] == 23:   # a Ctrl-C during step 12 (two windows a step)
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self)

    try:
        monkeypatch.setattr(StreamBatches, "next", interrupting_next)
        with pytest.raises(SystemExit):
            train.main(base + ["--out", str(tmp_path / "cut")])
    finally:
        signal.signal(signal.SIGINT, previous)
    checkpoint = torch.load(tmp_path / "cut" / "hope.pt", weights_only=False)
    assert checkpoint["step"] == 12 and checkpoint["memory_state"] is not None
    monkeypatch.setattr(StreamBatches, "next", real_next)
    try:
        resumed = train.main(base + ["--out", str(tmp_path / "cut"), "--resume"])["models"]["hope"]
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in whole["history"]]


def test_gradients_reach_meta_learned_initial_states():
    torch.manual_seed(3)
    for kw in (dict(), dict(memory="mlp")):
        m = hm.HOPE(tiny(**kw))
        x = torch.randint(0, 17, (2, 32))
        m(x, x)[1].backward()
        names = [n for n, _ in m.named_parameters() if n.split(".")[-1] in
                 ("gen_init", "mem_init", "kv_mlp_out", "kv_mlp_in", "ea_init", "mem_mlp_out", "mem_mlp_in")]
        assert len(names) >= 2 * 2
        for n, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            if n in names:
                assert p.grad.abs().sum() > 0, n


def test_matched_params_and_groups():
    cfg = tiny()
    h, t = hm.HOPE(cfg), hm.Transformer(hm.matched_transformer_config(cfg))
    assert abs(hm.count_params(h) - hm.count_params(t)) / hm.count_params(h) < 0.02
    groups = hm.hope_param_groups(h, lr=1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(h.parameters()))
    assert [g["update_every"] for g in groups] == [1, 1, 2]
    assert len(hm.hope_param_groups(hm.HOPE(tiny(cms=False)))) == 2


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(4)
    for m in (hm.HOPE(tiny(memory="mlp")), hm.Transformer(hm.matched_transformer_config(tiny()))):
        path = tmp_path / "m.pt"
        torch.save({"config": dataclasses.asdict(m.cfg), "model": m.state_dict()}, path)
        ck = torch.load(path)
        m2 = hm.build_model(hm.config_from_dict(json.loads(json.dumps(ck["config"]))))
        m2.load_state_dict(ck["model"])
        x = torch.randint(0, 17, (2, 20))
        assert torch.equal(m(x)[0], m2(x)[0])


def test_generate_and_long_context():
    torch.manual_seed(5)
    m = hm.HOPE(tiny())
    out = m.generate(torch.zeros(1, 1, dtype=torch.long), 5)
    assert out.shape == (1, 6)
    assert torch.isfinite(m(torch.randint(0, 17, (1, 300)))[0]).all()   # beyond block_size


# --------------------------------------------------------------------------- training script
def _corpus(tmp_path):
    import random
    rng = random.Random(0)
    words = ["the", "king", "queen", "of", "love", "and", "my", "lord", "thou", "art", "sweet"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(400))
    path = tmp_path / "tiny.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("model", ["hope"])
def test_train_50_steps_lowers_loss_and_resumes(tmp_path, model):
    from examples.hope import train
    path = _corpus(tmp_path)
    out = tmp_path / "out"
    args = ["--preset", "tiny", "--data", str(path), "--out", str(out), "--model", model,
            "--optimizer", "adamw", "--lr", "1e-2", "--sample-chars", "20", "--quiet", "--device", "cpu"]
    log = train.main(args)
    rec = log["models"][model]
    assert rec["history"][-1]["train_loss"] < rec["first_loss"] - 0.5
    assert rec["final_val_loss"] < rec["first_loss"] - 0.5
    assert (out / "train_log.json").exists() and (out / f"{model}.pt").exists()
    assert len(rec["sample"]) == 20 and rec["tokens_per_s"] > 0
    log2 = train.main(args[:-3] + ["--steps", "60", "--resume", "--sample-chars", "0"])
    h = log2["models"][model]["history"]
    assert [r["step"] for r in h] == [25, 50, 60]


def test_ctrl_c_saves_a_checkpoint_and_the_resume_is_bit_identical(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C (SIGINT) stops at a step boundary, checkpoints and prints the --resume
    command; resuming from it gives the uninterrupted run's numbers exactly."""
    import os
    import signal

    from examples.hope import train
    previous = signal.getsignal(signal.SIGINT)
    path = _corpus(tmp_path)
    base = ["--preset", "tiny", "--data", str(path), "--model", "hope", "--optimizer", "associative",
            "--steps", "30", "--sample-chars", "0", "--quiet", "--device", "cpu"]
    whole = train.main(base + ["--out", str(tmp_path / "whole")])["models"]["hope"]
    calls = {"n": 0}
    real_get_batch = train.get_batch

    def interrupting_get_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 12:   # a Ctrl-C during step 12
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_batch(*a, **k)

    try:
        monkeypatch.setattr(train, "get_batch", interrupting_get_batch)
        with pytest.raises(SystemExit) as stopped:
            train.main(base + ["--out", str(tmp_path / "cut")])
        assert stopped.value.code == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    printed = capsys.readouterr().out
    assert "interrupted after step 12" in printed and "--resume" in printed
    assert torch.load(tmp_path / "cut" / "hope.pt", weights_only=False)["step"] == 12
    monkeypatch.setattr(train, "get_batch", real_get_batch)
    try:
        resumed = train.main(base + ["--out", str(tmp_path / "cut"), "--resume"])["models"]["hope"]
    finally:
        signal.signal(signal.SIGINT, previous)
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in whole["history"]]


def test_lr_zero_is_an_error_not_the_default(tmp_path, capsys):
    from examples.hope import train
    with pytest.raises(SystemExit):
        train.parse_args(["--lr", "0"])
    assert "argument --lr: must be a number > 0" in capsys.readouterr().err


def test_optimizers_wire_multifrequency():
    deepopt = pytest.importorskip("deepopt")
    if not hasattr(deepopt, "MultiFrequency"):
        pytest.skip("deepopt.MultiFrequency not available")
    from examples.hope import train
    torch.manual_seed(0)
    m = hm.HOPE(tiny())
    x = torch.randint(0, 17, (2, 16))
    for name in ["associative", "adamw", "deep", "delta", "m3"]:
        opt = train.make_optimizer(name, m, 1e-3)
        assert isinstance(opt, deepopt.MultiFrequency)
        periods = sorted({g["update_every"] for g in opt.param_groups})
        assert periods == [1, 2]
        slow = [p for per, ps in m.cms_levels() if per == 2 for p in ps]
        before = [p.detach().clone() for p in slow]
        m(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(before, slow)), name    # period-2 waits
        m(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
        assert not all(torch.equal(a, b) for a, b in zip(before, slow)), name


def test_recall_task_format():
    from examples.hope import recall
    x, y = recall.make_batch(3, 4, 6, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 20)
    for b in range(3):
        pairs = {int(x[b, 2 * i]): int(x[b, 2 * i + 1]) for i in range(4)}
        for t in range(8, 20, 2):
            assert int(y[b, t]) == pairs[int(x[b, t])] == int(x[b, t + 1])
        assert (y[b, :8] == -100).all() and (y[b, 9::2] == -100).all()


def test_continual_script(tmp_path, monkeypatch):
    """continual.py and long_context.py on a fake sdist: in-context + CMS-only adaptation run and
    report forgetting; the long-context diagnosis reports per-position losses and state drift."""
    from _util import fake_shakespeare_cache
    from examples.hope import continual, train
    from examples.hope import long_context
    fake_shakespeare_cache(tmp_path, lines=150)
    out = tmp_path / "out"
    train.main(["--preset", "tiny", "--cache-dir", str(tmp_path), "--out", str(out), "--steps", "10",
                "--optimizer", "adamw", "--sample-chars", "0", "--quiet", "--device", "cpu"])
    res = continual.main(["--ckpt-dir", str(out), "--cache-dir", str(tmp_path), "--continual",
                          "--seq-len", "32", "--batch-size", "2", "--val-windows", "8"])
    for kind in ("hope", "transformer"):
        r = res["models"][kind]
        assert r["adapt_steps"] > 0 and "forgetting" in r and r["new_after_bpc"] > 0
    assert "new_stream" in res["models"]["hope"]
    assert (out / "continual.json").exists()
    lc = long_context.main(["--ckpt-dir", str(out), "--cache-dir", str(tmp_path), "--length", "64", "--bucket", "16",
                            "--reset", "16", "--windows", "2"])
    hope = lc["models"]["hope"]
    assert len(hope["carry_bpc"]) == len(hope["reset_bpc"]) == 4 and len(lc["models"]["transformer"]["carry_bpc"]) == 4
    # reset every bucket: each bucket starts from the initial state, the same distance after each
    assert hope["carry_bpc"][0] == hope["reset_bpc"][0]
    assert max(hope["reset_state_distance"]) - min(hope["reset_state_distance"]) < 0.5 * hope["carry_state_distance"][-1]


def test_throughput_mode(tmp_path):
    from examples.hope import train
    res = train.main(["--preset", "tiny", "--data", str(_corpus(tmp_path)), "--out", str(tmp_path / "o"),
                      "--throughput", "--optimizer", "adamw", "--device", "cpu"])
    assert set(res["median_tokens_per_s"]) == {"hope", "transformer"}
    assert (tmp_path / "o" / "throughput.json").exists()


def test_inner_momentum_changes_the_memory_and_is_for_linear_memories():
    """With inner momentum the memories carry a momentum state and read differently; with the
    token-loop reference in place of the chunked write the model computes the same."""
    torch.manual_seed(0)
    plain = hm.HOPE(tiny()).double()
    torch.manual_seed(0)
    moving = hm.HOPE(tiny(inner_momentum=0.9)).double()
    x = torch.randint(0, 17, (2, 40))
    _, _, state = moving(x, return_state=True)
    assert {"gen_momentum", "mem_momentum"} <= set(state[0])
    assert (plain(x)[0] - moving(x)[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="linear memories"):
        hm.HOPE(tiny(memory="mlp", inner_momentum=0.9))
    with pytest.raises(ValueError, match="gen_chunk_size by chunk_size, got .*gen_chunk_size=12, chunk_size=8"):
        hm.HOPE(tiny(gen_chunk_size=12, chunk_size=8))


def test_anchor_gate_at_its_neutral_setting_is_the_plain_memory_and_learns():
    """The anchor gate closed (g = 0) computes today's memory exactly; open, the read-out changes,
    the gate's logits get gradients, and a bad anchor_init names the range."""
    torch.manual_seed(0)
    plain = hm.HOPE(tiny(anchor_init=None)).double()
    gated = hm.HOPE(tiny(anchor_init=0.9)).double()
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("anchor_logit" in k for k in missing)
    x = torch.randint(0, 17, (2, 40))
    open_gate = gated(x)[0]
    assert (open_gate - plain(x)[0]).abs().max() > 1e-4
    with torch.no_grad():
        for block in gated.blocks:
            for p in block.titans.anchor_logit.values():
                p.fill_(-float("inf"))
    torch.testing.assert_close(gated(x)[0], plain(x)[0], rtol=0, atol=0)
    fresh = hm.HOPE(tiny(anchor_init=0.9))
    fresh(x, x)[1].backward()
    grads = [p.grad for b in fresh.blocks for p in b.titans.anchor_logit.values()]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"anchor_init must lie in \(0, 1\)"):
            hm.HOPE(tiny(anchor_init=bad))
    with pytest.raises(ValueError, match="linear memories"):
        hm.HOPE(tiny(memory="mlp", anchor_init=0.9))


def test_sliding_window_attention_sees_only_its_window():
    """window >= T is full attention; with window w the output at t ignores tokens before t - w + 1."""
    torch.manual_seed(0)
    cfg = hm.matched_transformer_config(tiny())
    m = hm.Transformer(cfg).double()
    x = torch.randint(0, 17, (2, 24))
    full = m(x)[0]
    m.cfg.window = 24
    torch.testing.assert_close(m(x)[0], full, rtol=0, atol=0)
    m.cfg.window = 5
    windowed = m(x)[0]
    x2 = x.clone()
    x2[:, :10] = (x2[:, :10] + 1) % 17
    # two layers: position t depends on t - 2 (w - 1) .. t
    torch.testing.assert_close(m(x2)[0][:, 10 + 2 * 4:], windowed[:, 10 + 2 * 4:], rtol=1e-12, atol=1e-12)
    assert (m(x2)[0][:, 10:10 + 4] - windowed[:, 10:10 + 4]).abs().max() > 1e-6
    assert (windowed[:, 8:] - full[:, 8:]).abs().max() > 1e-6


def test_passkey_cases_hold_the_key_at_both_ends_and_the_control_another():
    from examples.data import CharTokenizer
    from examples.hope import long_context as lc
    text = "".join(lc.PASSKEY_PROMPT) + lc.PASSKEY_LETTERS + " filler text of the play. " * 40
    tok = CharTokenizer(text)
    data = tok.encode_tensor(text)
    rows, positions, keys, controls = lc.passkey_cases(tok, data, 128, 50, seed=3)
    assert rows.shape == controls.shape == (50, 128) and keys.shape == (50, 5)
    start = len(lc.PASSKEY_PROMPT[0])
    for row, control, key in zip(rows, controls, keys):
        decoded = tok.decode(row)
        assert decoded.startswith(lc.PASSKEY_PROMPT[0]) and decoded.endswith(lc.PASSKEY_PROMPT[2] + tok.decode(key))
        assert torch.equal(row[start:start + 5], key) and torch.equal(row[positions], key)
        assert torch.equal(control[5 + start:], row[5 + start:]) and torch.equal(control[positions], key)
    assert (controls[:, start:start + 5] != keys).any(1).float().mean() > 0.9
    with pytest.raises(ValueError, match="too short"):
        lc.passkey_cases(tok, data, lc.PASSKEY_MIN_LENGTH - 1, 2, seed=0)
    with pytest.raises(ValueError, match="lacks"):
        lc.passkey_cases(CharTokenizer("abc "), data, 128, 2, seed=0)


def test_passkey_training_batch_masks_exactly_the_letters_to_recall():
    """passkey_trained.py's rows: a pass-key row's mask covers the asked key (== the key at the
    start) and nothing else; a copy row's masked letters repeat the letters before the newline;
    plain rows mask nothing; x, y are one row shifted."""
    import argparse

    from examples.data import CharTokenizer
    from examples.hope import long_context as lc
    from examples.hope.results import passkey_trained as pt
    text = "".join(lc.PASSKEY_PROMPT) + lc.PASSKEY_LETTERS + "\n filler text of the play. " * 40
    tok = CharTokenizer(text)
    data = tok.encode_tensor(text)
    g = torch.Generator().manual_seed(0)
    start = len(lc.PASSKEY_PROMPT[0])
    for ask_end in (lc.PASSKEY_MIN_LENGTH, 100, 129):
        rows, mask = pt.keyed_rows(tok, data, 6, 129, ask_end, g)
        assert rows.shape == mask.shape == (6, 129) and (mask.sum(1) == 5).all()
        for row, m in zip(rows, mask):
            assert torch.equal(row[m], row[start:start + 5])
            end = m.nonzero().max().item() + 1
            assert tok.decode(row[:end]).endswith(lc.PASSKEY_PROMPT[2] + tok.decode(row[start:start + 5]))
            assert end == ask_end
    halves = set()
    for _ in range(20):
        rows, mask = pt.copy_rows(tok, 4, 129, g)
        half = mask.sum(1)[0].item() + 1            # the copied string's length
        halves.add(half)
        assert rows.shape == (4, 129) and 5 <= half <= 64 and (mask.sum(1) == half - 1).all()
        assert tok.decode(rows[:, half]) == "\n" * 4 and torch.equal(rows[:, :half], rows[:, half + 1:2 * half + 1])
        assert torch.equal(rows[:, half + 2:2 * half + 1], rows[mask].view(4, -1)) and not mask[:, :half + 2].any()
    assert len(halves) > 5                          # the offset varies from batch to batch
    assert (pt.copy_rows(tok, 2, 129, g, fixed=64)[1].sum(1) == 63).all()
    for spread in (True, False):
        args = argparse.Namespace(share=0.25, copy_share=0.5, spread=spread, copy_len=None, segments=1)
        [(x, y, m)] = pt.training_batch(tok, data, args, 8, 128, g)
        assert x.shape == y.shape == m.shape == (8, 128) and torch.equal(x[:, 1:], y[:, :-1])
        assert (m[:2].sum(1) == 5).all() and (m[2:6].sum(1) > 3).all() and not m[6:].any()
        assert spread or (m[:2, -5:].all() and m[:2].sum() == 10)
    # --segments 3: the pass-key rows (first) span the whole windows up to their ask, the rest one window
    windows = set()
    args = argparse.Namespace(share=0.25, copy_share=0.5, spread=True, copy_len=None, segments=3)
    for _ in range(30):
        parts = pt.training_batch(tok, data, args, 8, 64, g)
        x, y, m = parts[0]
        width = x.shape[1]
        windows.add(width // 64)
        last = m[:2].nonzero()[:, 1].max().item()               # the asked key's last letter (in y)
        assert width % 64 == 0 and width - 64 <= last < width <= 192 and (m[:2].sum(1) == 5).all()
        assert sum(len(p[0]) for p in parts) == 8 and all(p[0].shape[1] == 64 for p in parts[1:])
    assert windows == {1, 2, 3}
    args.spread = False
    assert pt.training_batch(tok, data, args, 8, 64, g)[0][0].shape[1] == 192


def test_passkey_training_reads_long_rows_window_by_window():
    """windowed_ce == the loss of one long call (the memory state carried between windows); with
    ``detach`` a later window's gradient is that of the window read alone from the (constant)
    state before it, without it the gradient also flows through the earlier window's writes."""
    from examples.hope.results.passkey_trained import windowed_ce
    torch.manual_seed(0)
    model = hm.HOPE(tiny(cms=False)).double()
    x, y = torch.randint(0, 17, (2, 64)), torch.randint(0, 17, (2, 64))
    with torch.no_grad():
        whole = torch.nn.functional.cross_entropy(model(x)[0].transpose(1, 2), y, reduction="none")
    grads = {}
    for detach in (True, False):
        ce = windowed_ce(model, x, y, 32, detach)
        torch.testing.assert_close(ce.detach(), whole)
        model.zero_grad()
        ce[:, 32:].sum().backward()
        grads[detach] = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    state = hm.detach_state(model(x[:, :32], return_state=True)[2])
    torch.nn.functional.cross_entropy(model(x[:, 32:], state=state)[0].transpose(1, 2), y[:, 32:],
                                      reduction="sum").backward()
    for a, b, c in zip(grads[True], [p.grad for p in model.parameters()], grads[False]):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, c) for a, c in zip(grads[True], grads[False]))


def test_long_context_benchmark_writes_the_issue_schema(tmp_path):
    """long_context.py end to end on the tiny preset and a fake corpus: every model's row has the
    result file's keys, 16 position buckets, recall shares in [0, 1] (None where 1x cannot hold the
    prompt), tokens/s at 128/512/2048; the table, summary and plot come from it."""
    from _util import fake_shakespeare_cache
    from examples.hope import long_context as lc
    fake_shakespeare_cache(tmp_path, lines=150, extra="".join(lc.PASSKEY_PROMPT) + lc.PASSKEY_LETTERS + "\n")
    out = tmp_path / "lc.json"
    res = lc.main(["--preset", "tiny", "--steps", "3", "--seed", "0", "--windows", "2", "--cases", "3", "--jobs", "1",
                   "--threads", "1", "--runs", str(tmp_path / "runs"), "--out", str(out), "--cache-dir", str(tmp_path)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    assert [r["model"] for r in res["models"]] == list(lc.MODELS)
    for r in res["models"]:
        assert {"model", "train_len", "positions", "bpc", "recall", "tokens_per_s"} <= set(r)
        assert r["train_len"] == 32 and r["positions"] == [32 * (i + 1) for i in range(16)] and len(r["bpc"]) == 16
        assert all(math.isfinite(b) and b > 0 for b in r["bpc"])
        assert r["recall"]["1x"] is None and all(0 <= r["recall"][k] <= 1 for k in ("4x", "16x"))
        assert set(r["tokens_per_s"]) == {"128", "512", "2048"} and min(r["tokens_per_s"].values()) > 0
        assert r["model"] in lc.table(res)
    assert res["models"][-1]["window"] == 32 and res["summary"] == lc.summary(res)


def test_defaults_anchor_gate_one_mlp_and_old_checkpoints_load_without_the_gate():
    from examples.hope import train
    configs = lambda *flags: train.build_configs(train.parse_args(["--preset", "tiny", *flags]), 17)["hope"]
    assert configs().anchor_init == hm.HopeConfig.anchor_init == 0.9
    assert configs().cms is hm.HopeConfig.cms is False and configs("--cms").cms and not configs("--no-cms").cms
    assert configs("--anchor-init", "0").anchor_init is None and configs("--anchor-init", "0.5").anchor_init == 0.5
    assert configs("--memory", "mlp").anchor_init is None
    with pytest.raises(ValueError, match="anchor_init must lie in"):
        hm.HOPE(configs("--memory", "mlp", "--anchor-init", "0.5"))
    old = dataclasses.asdict(tiny(anchor_init=None))
    del old["anchor_init"]                                   # a config saved before the gate
    model = hm.build_model(hm.config_from_dict(old))
    model.load_state_dict(hm.HOPE(tiny(anchor_init=None)).state_dict())
    assert model.cfg.anchor_init is None


def test_long_context_trains_each_run_once():
    """The two Transformer++ rows read one checkpoint: long_context.py trains it once per seed."""
    import threading
    import types

    from examples.hope import long_context
    calls, lock = [], threading.Lock()

    def fake_train(runs, model, flags, lr, seed, steps, preset, cache_dir):
        with lock:
            calls.append((model, tuple(flags), seed))
        return dict(dir=f"{model}-{'_'.join(flags)}-{seed}")
    args = types.SimpleNamespace(jobs=2, seed=[1, 2], steps=5, preset="tiny", cache_dir=None)
    trained = long_context.train_models(fake_train, None, args)
    unique = {(m, tuple(f)) for m, f, _ in long_context.MODELS.values()}
    assert len(unique) == len(long_context.MODELS) - 1
    assert sorted(calls) == sorted((m, f, s) for m, f in unique for s in (1, 2))
    rows = [name for name, (m, _, _) in long_context.MODELS.items() if m == "transformer"]
    assert trained[(rows[0], 2)] == trained[(rows[1], 2)] and len(trained) == 2 * len(long_context.MODELS)
