"""`fednl score`: bins, the memory-off path against a full windowed forward, streaming against a full forward,
bounded carried state, the --json record and every bad-input path (exit 2, one line naming the problem)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fednl.cli import app
from fednl.eval import score as score_mod
from fednl.eval.position import token_ce
from fednl.eval.score import prepare, score_file, stream_ce
from fednl.models import LoraConfig, MemoryConfig, ModelConfig, build_model
from fednl.models import rules as rules_mod
from fednl.models.rules import RULE_GROUPS, rule_names, save_rule
from fednl.models.titans import convert_to_titans, set_gate_override

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin nuzzled "
        "into his breast in an effort to escape the vile wind, slipped quickly through the glass doors. ") * 6
# a trained-looking rule with every non-default design switch
DESIGN = MemoryConfig(attn_window=16, decay=True, gate_source="query", write="evicted", mix="residual")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("score") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rule_file(tmp_path_factory) -> Path:
    model = build_model("titans", ModelConfig(source="tiny"), DESIGN, LoraConfig(r=2), seed=3)
    g = torch.Generator().manual_seed(0)
    names = {n for grp in RULE_GROUPS for n in rule_names(model)[grp]}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("rule") / "tiny-rule.safetensors"
    return save_rule(model, path, provenance={"run": "test"})


def _full_ce(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Per-token CE of one full (non-streaming) forward: position t = the predicted token."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x[:, :-1]).logits
    return token_ce(logits, x[:, 1:])[0].double()


def _bins(ce: torch.Tensor, bin_size: int) -> list[tuple[int, int, float]]:
    pos = torch.arange(1, ce.numel() + 1)
    out = []
    for b in range(int(pos.max()) // bin_size + 1):
        sel = (pos // bin_size) == b
        out.append((b * bin_size, int(sel.sum()), float(ce[sel].mean())))
    return out


def test_bins_add_up(text_file: Path) -> None:
    rec = score_file(text_file, rule="none", model="tiny", window=16, sinks=2, bin_size=100, chunk=64)
    n = len(TEXT.encode()) - 1
    assert rec["tokens"] == n == sum(b["tokens"] for b in rec["bins"])
    assert [b["start"] for b in rec["bins"]] == list(range(0, n + 1, 100))
    assert rec["bins"][0]["tokens"] == 99 and all(b["tokens"] == 100 for b in rec["bins"][1:-1])
    weighted = sum(b["ce"] * b["tokens"] for b in rec["bins"]) / n
    assert rec["ce"] == pytest.approx(weighted, rel=1e-12)


@pytest.mark.parametrize("rule", ["none", "file"])
def test_memory_off_is_the_windowed_softmax_path(text_file: Path, rule_file: Path, rule: str) -> None:
    """--memory off streams exactly what a full forward with the gate forced to 0 computes, whatever the rule."""
    spec = str(rule_file) if rule == "file" else "none"
    model, tok, _ = prepare(rule=spec, model="tiny", window=16, sinks=2, memory="off")
    ids = tok.encode(TEXT)
    twin, _, _ = prepare(rule=spec, model="tiny", window=16, sinks=2, memory="on")
    set_gate_override(twin, 0.0)
    full = _full_ce(twin, ids)  # one forward over the whole text, band mask of the window + sinks
    rec = stream_ce(model, ids, bin_size=128, chunk=37)
    assert rec["ce"] == pytest.approx(float(full.mean()), abs=1e-5)
    for b, (start, n, ce) in zip(rec["bins"], _bins(full, 128), strict=True):
        assert (b["start"], b["tokens"]) == (start, n) and b["ce"] == pytest.approx(ce, abs=1e-5)
    # the softmax path does not depend on the rule ...
    bare, _, _ = prepare(rule="none", model="tiny", window=16, sinks=2, memory="off")
    assert stream_ce(bare, ids, bin_size=128, chunk=37)["ce"] == pytest.approx(rec["ce"], abs=1e-6)
    # ... but the memory does
    set_gate_override(twin, None)
    assert abs(stream_ce(twin, ids, chunk=37)["ce"] - rec["ce"]) > 1e-4


def test_memory_on_streaming_matches_a_full_forward(rule_file: Path) -> None:
    model, tok, rule = prepare(rule=str(rule_file), model="tiny", window=16, sinks=2)
    assert rule is not None and model.fednl_memory_config.write == "evicted"
    ids = tok.encode(TEXT)[:300]
    full = _full_ce(model, ids)
    rec = stream_ce(model, ids, bin_size=64, chunk=23)
    assert rec["ce"] == pytest.approx(float(full.mean()), abs=1e-4)


def test_the_scoring_model_is_the_converted_backbone(rule_file: Path) -> None:
    """The rank-1 frozen LoRA that build_model adds is a no-op: the scoring model computes exactly what the bare
    converted backbone with the same rule computes."""
    from fednl.models.loading import load_backbone
    from fednl.models.rules import install_rule, load_rule

    model, tok, rule = prepare(rule=str(rule_file), model="tiny", window=16, sinks=2)
    bare = convert_to_titans(copy.deepcopy(load_backbone(ModelConfig(source="tiny"))[0]),
                             rule.memory_config.model_copy(update={"attn_window": 16, "attn_sinks": 2}))
    install_rule(bare, load_rule(rule_file))
    x = torch.tensor([tok.encode(TEXT)[:80]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, bare(input_ids=x).logits)


def test_state_bytes_stay_constant_as_the_stream_grows(rule_file: Path) -> None:
    model, tok, _ = prepare(rule=str(rule_file), model="tiny", window=16, sinks=4)
    ids = tok.encode(TEXT)
    short, long = stream_ce(model, ids[:300], chunk=32), stream_ce(model, ids[:600], chunk=32)
    assert short["state_bytes"] == long["state_bytes"] > 0
    # what it holds: per layer a [1, H, D, D] memory, sinks + window - 1 window keys/values, the window's pending
    # writes (k, v, beta, g) — and nothing that grows with the 600 tokens
    cfg = ModelConfig(source="tiny")
    H, Hkv, D, L = cfg.tiny_heads, cfg.tiny_kv_heads, cfg.tiny_hidden // cfg.tiny_heads, cfg.tiny_layers
    per_layer = H * D * D + 2 * Hkv * (4 + 16 - 1) * D + 16 * (2 * H * D + 2 * H)
    assert long["state_bytes"] == L * per_layer * 4


# ------------------------------------------------------------------ the command
def _score(*args: str) -> object:
    return CliRunner().invoke(app, ["score", *args, "--no-progress"])


def test_cli_json_record(text_file: Path, rule_file: Path) -> None:
    res = _score(str(text_file), "--rule", str(rule_file), "--window", "16", "--sinks", "2", "--json",
                 "--bin-size", "200", "--max-tokens", "700", "--chunk", "50")
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert set(rec) >= {"bins", "ce", "tokens", "rule", "window", "sinks", "memory", "seconds", "state_bytes"}
    assert rec["tokens"] == 699 and [b["start"] for b in rec["bins"]] == [0, 200, 400, 600]
    assert all(set(b) == {"start", "tokens", "ce"} for b in rec["bins"])
    assert (rec["rule"], rec["window"], rec["sinks"], rec["memory"], rec["model"]) == (str(rule_file), 16, 2, "on",
                                                                                        "tiny")
    assert isinstance(rec["ce"], float) and isinstance(rec["state_bytes"], int) and rec["seconds"] >= 0
    # the rule was trained with window 16 and 4 sinks: a note on stderr, never in the JSON on stdout
    assert "trained with window 16 and 4 sinks" in res.stderr
    off = json.loads(_score(str(text_file), "--rule", str(rule_file), "--window", "16", "--sinks", "2", "--json",
                            "--max-tokens", "700", "--memory", "off").stdout)
    assert off["memory"] == "off" and off["tokens"] == 699 and off["ce"] != rec["ce"]


def test_cli_table_and_progress(text_file: Path) -> None:
    res = CliRunner().invoke(app, ["score", str(text_file), "--model", "tiny", "--rule", "none", "--window", "8",
                                   "--chunk", "64", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].endswith("model tiny, rule none, window 8 + 4 sinks, memory on")
    assert "overall CE" in res.stdout and "scoring" in res.stderr and "scoring" not in res.stdout


def test_default_rule(text_file: Path, rule_file: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(rules_mod, "rules_dir", lambda: tmp_path)
    res = _score(str(text_file), "--model", "tiny")
    assert res.exit_code == 2
    assert res.stderr.strip() == ("error: no packaged rule named 'default-tiny' exists (packaged rules: none yet); "
                                  "give a path to a rule file (`fednl rule export RUN_DIR --out FILE` writes one), "
                                  "or --rule none to score with an untrained memory")
    (tmp_path / "default-tiny.safetensors").write_bytes(rule_file.read_bytes())
    res = _score(str(text_file), "--model", "tiny", "--json", "--max-tokens", "64")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rule"] == "default-tiny"


def test_bad_inputs_exit_2_with_one_line(text_file: Path, rule_file: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one = tmp_path / "one.txt"
    one.write_text("a")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ab\xff\xfe")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    smol = tmp_path / "smol.safetensors"
    save_rule(build_model("titans", ModelConfig(source="tiny"), DESIGN, LoraConfig(r=2)), smol,
              model_source="smollm2")
    tiny = ["--model", "tiny", "--rule", "none"]
    cases = [
        ([str(tmp_path / "missing.txt"), *tiny], "missing.txt: no such file"),
        ([str(tmp_path), *tiny], "is not a file"),
        ([str(empty), *tiny], "empty.txt is empty"),
        ([str(one), *tiny], "has 1 token(s); scoring needs at least 2"),
        ([str(binary), *tiny], "is not UTF-8 text (bad byte at offset 2)"),
        ([str(text_file), "--model", "tiny", "--rule", str(junk)], "is not a safetensors file"),
        ([str(text_file), "--model", "tiny", "--rule", str(tmp_path / "gone.safetensors")], "does not exist"),
        ([str(text_file), "--model", "tiny", "--rule", str(smol)], "trained for backbone 'smollm2', not 'tiny'"),
        ([str(text_file), *tiny, "--window", "0"], "--window must be >= 1"),
        ([str(text_file), *tiny, "--sinks", "-1"], "--sinks must be >= 0"),
        ([str(text_file), *tiny, "--memory", "maybe"], "--memory must be 'on' or 'off'"),
        ([str(text_file), *tiny, "--bin-size", "0"], "--bin-size and --chunk must be >= 1"),
        ([str(text_file), *tiny, "--max-tokens", "1"], "--max-tokens must be >= 2"),
        ([str(text_file), *tiny, "--threads", "0"], "--threads must be >= 1"),
        ([str(text_file), "--model", "gpt9", "--rule", "none"], "model source must be"),
        ([str(text_file), "--model", "hf:/nowhere/x"], "no default rule for 'hf:/nowhere/x'"),
    ]
    for args, message in cases:
        res = _score(*args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, res.stderr)


def test_cli_defaults_match_the_library() -> None:
    from fednl.cli import score as cli_score

    assert (cli_score.DEFAULT_RULE, cli_score.WINDOW, cli_score.SINKS, cli_score.BIN_SIZE, cli_score.CHUNK) == (
        score_mod.DEFAULT_RULE, score_mod.WINDOW, score_mod.SINKS, score_mod.BIN_SIZE, score_mod.CHUNK)


def test_cache_streams_like_a_full_forward_and_changes_only_far_positions(rule_file: Path, text_file: Path) -> None:
    model, tok, _ = prepare(rule=str(rule_file), model="tiny", window=16, sinks=2, cache=8, cache_every=4)
    plain, _, _ = prepare(rule=str(rule_file), model="tiny", window=16, sinks=2)
    ids = tok.encode(TEXT)[:300]
    full, base = _full_ce(model, ids), _full_ce(plain, ids)
    assert stream_ce(model, ids, bin_size=64, chunk=23)["ce"] == pytest.approx(float(full.mean()), abs=1e-4)
    # nothing is evicted before position 18 (16 + 2 sinks), so nothing can be cached before the update at 20
    torch.testing.assert_close(full[:19], base[:19], rtol=0, atol=1e-6)
    assert (full[20:] - base[20:]).abs().max() > 1e-4
    res = _score(str(text_file), "--rule", str(rule_file), "--window", "16", "--sinks", "2", "--json",
                 "--cache", "8", "--cache-every", "4", "--max-tokens", "300")
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["cache"] == 8 and rec["ce"] == pytest.approx(float(full.mean()), abs=1e-4)
