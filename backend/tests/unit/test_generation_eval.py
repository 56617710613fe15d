"""Evaluation by generation: metrics of generated answers, batched generation, GenerationEvalCallback in training
(best checkpoint by a generation score, resume, samples, report, two processes), config, CLI and bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _generation_eval_worker import EVAL_ROWS
from _generation_eval_worker import evaluate as evaluate_in_one_process
from helpers import build_tiny_tokenizer, read_wandb_runs, tiny_llama, write_jsonl
from test_trainer import make_config

from app.sft import (
    CheckpointCallback,
    ConfigError,
    DataError,
    EarlyStoppingCallback,
    GenerationEvalCallback,
    SFTConfig,
    SFTTrainer,
    WandBCallback,
    checkpointing,
)
from app.sft.cli import main
from app.sft.data import IGNORE_INDEX, tokenize_example
from app.sft.gen_metrics import BUILTIN_METRICS, Generation, resolve_metrics, score_generations
from app.sft.generation import generate_all, generate_batch, generation_prompts, stop_token_ids
from app.sft.metrics_log import MetricsLog
from app.sft.report import render_report
from app.sft.templates import default_registry

QUESTION = "what is the capital of france ?"
ANSWER = "the capital is paris"
TASK = [{"instruction": QUESTION, "output": ANSWER}] * 16
"""One question with one fixed answer: a tiny random model learns it in a few dozen steps."""


def scores_of(names, generations):
    scores, warnings = score_generations(resolve_metrics(names), generations)
    assert warnings == {}
    return scores


# --- metrics ------------------------------------------------------------------------------------------------------


def test_builtin_metrics_on_hand_written_answers():
    cases = [
        Generation("  Paris \n", "Paris"),
        Generation("paris!", "Paris."),
        Generation('{"b": [1, 2], "a": "x"}', '{"a": "x", "b": [1, 2]}'),
        Generation('{"a": "x", "b": [1, 2]', '{"a": "x", "b": [1, 2]}', stopped=False),  # cut off: no EOS
        Generation("The answer is Paris, I think", "Paris"),
    ]
    names = ["exact_match", "exact_match_normalized", "json_valid", "json_match", "contains", "stopped"]
    table = [[score[f"gen_{name}"] for name in names] for score in scores_of(names, cases)]
    assert table == [
        [1.0, 1.0, 0.0, 0.0, 1.0, 1.0],
        [0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 1.0, 1.0, 0.0, 1.0],  # key order does not matter to json_match
        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # malformed JSON (equal without punctuation), and it never stopped
        [0.0, 0.0, 0.0, 0.0, 1.0, 1.0],
    ]
    assert scores_of(["json_match"], [Generation("1", "not json")]) == [{"gen_json_match": 0.0}]


def test_rouge_and_bleu_through_their_packages():
    same, other = Generation("the cat sat on the mat", "the cat sat on the mat"), Generation("dogs run", "the cat")
    (same_scores, other_scores) = scores_of(["rougeL", "bleu"], [same, other])
    assert same_scores == {"gen_rougeL": pytest.approx(1.0), "gen_bleu": pytest.approx(1.0)}
    assert other_scores["gen_rougeL"] == 0.0 and other_scores["gen_bleu"] < 0.1


def test_an_unknown_metric_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        resolve_metrics(["exact_match", "exactmatch"])
    assert "'exactmatch'" in str(error.value)
    assert all(name in str(error.value) for name in BUILTIN_METRICS)
    with pytest.raises(ConfigError, match="unknown generation metric 'accuracy'"):
        GenerationEvalCallback([{"prompt": "hi", "reference": "hi"}], metrics=["accuracy"])
    with pytest.raises(ConfigError, match="generation_eval_metrics: .*unknown generation metric 'f1'"):
        SFTConfig(base_model="m", generation_eval_metrics=["exact_match", "f1"])


def test_a_custom_callable_is_reported_under_its_name():
    def first_word(prediction: str, reference: str) -> float:
        return float(prediction.split()[:1] == reference.split()[:1])

    (metric,) = resolve_metrics([first_word])
    assert metric.key == "gen_first_word"
    assert scores_of([first_word, "exact_match"], [Generation("paris is it", "paris")]) == [
        {"gen_first_word": 1.0, "gen_exact_match": 0.0}
    ]


def test_a_raising_metric_scores_that_sample_zero_and_says_which():
    def picky(prediction: str, reference: str) -> float:
        if prediction == "boom":
            raise KeyError("no such key")
        return 1.0

    scores, warnings = score_generations(resolve_metrics([picky]), [Generation("ok", ""), Generation("boom", "")])
    assert scores == [{"gen_picky": 1.0}, {"gen_picky": 0.0}]
    assert list(warnings) == ["picky"] and "sample 1" in warnings["picky"] and "KeyError" in warnings["picky"]


# --- prompts and batched generation -------------------------------------------------------------------------------


@pytest.mark.parametrize("template_name", ["alpaca", "chatml", "llama2", "tokenizer"])
def test_prompts_are_the_training_tokens_up_to_the_answer(template_name):
    tokenizer, template = build_tiny_tokenizer(), default_registry.get(template_name)
    row = {"instruction": "add", "input": "1 plus 2", "output": "three"}
    (prompt,) = generation_prompts([row], tokenizer, dataset_format="alpaca", template=template)
    example = tokenize_example(row, tokenizer, template=template, max_seq_length=64)
    first_trained = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert prompt.input_ids == example["input_ids"][:first_trained]
    assert (prompt.prompt, prompt.reference) == ("add\n\n1 plus 2", "three")


def test_row_shapes_chat_prompt_and_messages_and_completion_refused():
    tokenizer, template = build_tiny_tokenizer(), default_registry.get("chatml")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "name a city"}, {"role": "assistant", "content": "paris"}]}
    explicit = {"messages": chat["messages"][:3], "reference": "paris"}
    prompts = generation_prompts([chat, explicit, {"prompt": "name a city", "reference": "rome"}], tokenizer,
                                 dataset_format="chat", template=template)
    assert [p.reference for p in prompts] == ["paris", "paris", "rome"]
    assert prompts[0].input_ids == prompts[1].input_ids  # the last assistant turn is the reference
    assert tokenizer.decode(prompts[2].input_ids).endswith("<|im_start|> assistant")
    with pytest.raises(DataError, match="row 1: completion rows .* no reference answer"):
        generation_prompts([{"text": "once upon a time"}], tokenizer, dataset_format="completion", template=None)
    with pytest.raises(DataError, match="row 2: missing field 'output'"):
        generation_prompts([TASK[0], {"instruction": "x"}], tokenizer, dataset_format="alpaca",
                           template=default_registry.get("alpaca"))


def test_batched_generation_gives_the_one_at_a_time_answers_and_restores_train_mode():
    tokenizer, model = build_tiny_tokenizer(), tiny_llama(seed=1)
    template = default_registry.get("alpaca")
    rows = [{"instruction": f"what is {a} plus {b}", "output": "x"} for a in range(3) for b in range(3)]
    rows.append({"instruction": "add", "input": "one plus two plus three plus four", "output": "ten"})
    prompts = [p.input_ids for p in generation_prompts(rows, tokenizer, dataset_format="alpaca", template=template)]
    settings = dict(max_new_tokens=5, stop_ids=stop_token_ids(model, tokenizer, template))
    model.train()
    batched = generate_all(model, tokenizer, prompts, batch_size=4, **settings)
    assert model.training
    single = [generate_batch(model, tokenizer, [ids], **settings)[0] for ids in prompts]
    assert batched == single
    assert len({answer.text for answer in batched}) > 1  # not one answer for everything


def test_an_answer_without_a_stop_token_has_not_stopped():
    tokenizer, model = build_tiny_tokenizer(), tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy always picks token 0 (the pad token)
    ids = build_tiny_tokenizer()("what is the capital")["input_ids"]
    (never,) = generate_batch(model, tokenizer, [ids], max_new_tokens=3, stop_ids=[3])
    (at_once,) = generate_batch(model, tokenizer, [ids], max_new_tokens=3, stop_ids=[0])
    assert (never.stopped, never.num_tokens) == (False, 3)
    assert (at_once.stopped, at_once.num_tokens, at_once.text) == (True, 1, "")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_batch(model, tokenizer, [ids], max_new_tokens=0, stop_ids=[3])


# --- the callback in training -------------------------------------------------------------------------------------


def train(tmp_path: Path, callbacks, *, resume=None, eval_dataset=None, **overrides) -> tuple[SFTTrainer, dict]:
    settings = dict(max_steps=12, learning_rate=1e-2, eval_steps=4, save_steps=4, save_total_limit=None)
    settings.update(overrides)
    config = make_config(tmp_path, Path("unused"), **settings)
    trainer = SFTTrainer(config, callbacks=callbacks, model=tiny_llama(seed=0), tokenizer=build_tiny_tokenizer(),
                         train_dataset=TASK, eval_dataset=eval_dataset)
    return trainer, trainer.train(resume_from_checkpoint=resume)


def test_a_tiny_model_learns_the_fixed_answer_and_the_samples_and_report_show_it(tmp_path):
    callback = GenerationEvalCallback(TASK[:3], metrics=["exact_match", "stopped"], eval_steps=2, max_new_tokens=8)
    trainer, _ = train(tmp_path, [callback])
    history = callback.history
    assert [entry["step"] for entry in history] == [2, 4, 6, 8, 10, 12]
    assert history[0]["gen_exact_match"] < 1.0 and history[-1]["gen_exact_match"] == 1.0
    assert history[-1]["gen_stopped"] == 1.0 and history[-1]["gen_tokens_per_second"] > 0
    assert trainer.metrics["gen_exact_match"] == 1.0  # published: the trainer holds the newest value

    out = tmp_path / "out"
    samples = [json.loads(line) for line in (out / "generations" / "step_12.jsonl").read_text().splitlines()]
    assert [(s["prompt"], s["reference"], s["prediction"]) for s in samples] == [(QUESTION, ANSWER, ANSWER)] * 3
    assert samples[0]["scores"] == {"gen_exact_match": 1.0, "gen_stopped": 1.0} and samples[0]["stopped"]
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    evals = [r for r in records if r["type"] == "eval" and "gen_exact_match" in r]
    assert [(r["step"], r["gen_exact_match"]) for r in evals] == [(e["step"], e["gen_exact_match"]) for e in history]
    report = (out / "report.html").read_text()
    assert "Evaluation by generation" in report and "gen_exact_match" in report
    assert "first evaluation (step 2)" in report and "best evaluation (step" in report


def test_the_report_shows_generation_curves_and_the_first_and_best_samples(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step, score in [(2, 0.0), (4, 1.0), (6, 0.5)]:
        log.write("train", step, {"loss": 1.0 / step, "learning_rate": 1e-3, "tokens_per_second": 10.0}, epoch=0.1)
        log.write("eval", step, {"gen_exact_match": score, "gen_time_s": 0.1}, epoch=0.1)
        sample = {"step": step, "index": 0, "prompt": "2 + 2?", "reference": "4", "prediction": f"<answer {step}>"}
        write_jsonl(tmp_path / "generations" / f"step_{step}.jsonl", [sample])
    log.close()
    render_report(tmp_path)
    page = (tmp_path / "report.html").read_text()
    section = page[page.index("Evaluation by generation"):]
    assert "first evaluation (step 2)" in section and "best evaluation (step 4, by gen_exact_match)" in section
    assert "&lt;answer 2&gt;" in section and "&lt;answer 4&gt;" in section and "&lt;answer 6&gt;" not in section
    assert "gen_time_s" not in section  # speed is not a score


class Scripted:
    """A metric whose value is set per evaluation (one sample each): 0.2, 0.9, 0.5, 0.1."""

    __name__ = "scripted"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prediction: str, reference: str) -> float:
        self.calls += 1
        return [0.2, 0.9, 0.5, 0.1][self.calls - 1]


def test_the_best_checkpoint_is_the_highest_generation_score_and_rotation_keeps_it(tmp_path):
    saver = CheckpointCallback(tmp_path / "ckpt", save_steps=2, save_total_limit=1, monitor="gen_scripted",
                               mode="max")
    callback = GenerationEvalCallback(TASK[:1], metrics=[Scripted()], eval_steps=2, max_new_tokens=2)
    trainer, summary = train(tmp_path, [saver, callback], max_steps=8, checkpoint_dir=str(tmp_path / "ckpt"))
    assert trainer.state.best_step == 4 and trainer.state.best_metric == pytest.approx(0.9)
    kept = sorted(path.name for path in (tmp_path / "ckpt").glob("checkpoint_step_*"))
    assert kept == ["checkpoint_step_4", "checkpoint_step_8"]  # the best, and the newest
    assert (tmp_path / "ckpt" / checkpointing.BEST_POINTER).read_text().strip() == "checkpoint_step_4"
    assert Path(summary["best_checkpoint"]).name == "checkpoint_step_4"


def test_a_monitored_generation_metric_nobody_produces_is_named_once(tmp_path, caplog):
    stopper = EarlyStoppingCallback(patience=1, monitor="gen_exact_match", mode="max")
    with caplog.at_level(logging.WARNING, logger="app.sft"):
        _, summary = train(tmp_path, [stopper], max_steps=8, eval_dataset=TASK[:2], eval_steps=2)
    warned = [r.getMessage() for r in caplog.records if "gen_exact_match" in r.getMessage()]
    assert len(warned) == 1 and "val_loss" in warned[0]  # names the metrics that do exist
    assert summary["global_step"] == 8  # and training goes on


def test_early_stopping_follows_a_generation_metric(tmp_path):
    stopper = EarlyStoppingCallback(patience=2, monitor="gen_stopped", mode="max")
    callback = GenerationEvalCallback(TASK[:1], metrics=["stopped"], eval_steps=1, max_new_tokens=1)
    _, summary = train(tmp_path, [stopper, callback], max_steps=12)
    assert summary["global_step"] == 3  # a 1-token limit never lets the answer stop: 0.0, 0.0, 0.0


def test_a_resumed_run_continues_the_history_on_the_same_prompts(tmp_path):
    def make():
        rows = TASK[:4] + [{"prompt": QUESTION, "reference": "paris"}]
        return GenerationEvalCallback(rows, eval_steps=4, num_samples=3, sample_seed=7, max_new_tokens=8)

    straight = make()
    train(tmp_path, [straight])
    resumed = make()
    train(tmp_path, [resumed], resume=str(tmp_path / "out" / "checkpoints" / "checkpoint_step_8"))
    same = lambda history: [{k: v for k, v in e.items() if k != "gen_time_s" and k != "gen_tokens_per_second"}  # noqa: E731
                            for e in history]
    assert [e["step"] for e in resumed.history] == [4, 8, 12]  # 4 and 8 restored, 12 evaluated again
    assert same(resumed.history) == same(straight.history)
    assert resumed.selection == straight.selection and len(straight.selection) == 3
    assert straight.selection != [0, 1, 2]  # a seeded sample, not the first rows


def test_sampled_generation_leaves_the_training_random_numbers_alone(tmp_path):
    callback = GenerationEvalCallback(TASK[:2], temperature=0.8, max_new_tokens=4)
    trainer = SFTTrainer(make_config(tmp_path, Path("unused")), model=tiny_llama(), tokenizer=build_tiny_tokenizer(),
                         train_dataset=TASK)
    before = torch.get_rng_state()
    first = callback.evaluate(trainer, 3)
    assert torch.equal(torch.get_rng_state(), before)
    assert callback.evaluate(trainer, 3)["gen_exact_match"] == first["gen_exact_match"]  # seeded by the step


def test_a_raising_metric_warns_once_and_training_goes_on(tmp_path, caplog):
    def fragile(prediction: str, reference: str) -> float:
        raise ZeroDivisionError("division by zero")

    callback = GenerationEvalCallback(TASK[:2], metrics=["exact_match", fragile], eval_steps=2, max_new_tokens=3)
    with caplog.at_level(logging.WARNING, logger="app.sft"):
        _, summary = train(tmp_path, [callback], max_steps=4)
    assert summary["global_step"] == 4 and [e["gen_fragile"] for e in callback.history] == [0.0, 0.0]
    warned = [r.getMessage() for r in caplog.records if "fragile" in r.getMessage()]
    assert len(warned) == 1 and "sample 0" in warned[0] and "ZeroDivisionError" in warned[0]


def test_bad_arguments_are_refused_with_their_name():
    with pytest.raises(ConfigError, match="eval_dataset is empty"):
        GenerationEvalCallback([])
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer >= 1, got 0"):
        GenerationEvalCallback(TASK, max_new_tokens=0)
    with pytest.raises(ConfigError, match="num_samples .* got 0"):
        GenerationEvalCallback(TASK, num_samples=0)
    with pytest.raises(ConfigError, match="generation_max_new_tokens"):
        SFTConfig(base_model="m", generation_max_new_tokens=0)


def test_completion_rows_are_refused_when_the_evaluation_starts(tmp_path):
    config = make_config(tmp_path, Path("unused"), dataset_format="completion", max_steps=1, eval_steps=1)
    callback = GenerationEvalCallback([{"text": "a story"}])
    trainer = SFTTrainer(config, callbacks=[callback], model=tiny_llama(), tokenizer=build_tiny_tokenizer(),
                         train_dataset=[{"text": "the cat is big"}] * 4)
    with pytest.raises(DataError, match="row 1: completion rows .* 'prompt' and 'reference'"):
        trainer.train()


def test_the_config_switches_it_on_without_code(tmp_path):
    config = make_config(tmp_path, Path("unused"), max_steps=4, eval_steps=2, generation_eval_samples=2,
                         generation_eval_metrics="exact_match,stopped", generation_max_new_tokens=6,
                         generation_eval_steps=4)
    trainer = SFTTrainer(config, model=tiny_llama(), tokenizer=build_tiny_tokenizer(), train_dataset=TASK,
                         eval_dataset=TASK[:5])
    trainer.train()
    (callback,) = [cb for cb in trainer.callbacks if isinstance(cb, GenerationEvalCallback)]
    assert [m.key for m in callback.metrics] == ["gen_exact_match", "gen_stopped"]
    assert (callback.max_new_tokens, callback.selection) == (6, [0, 1])
    assert [entry["step"] for entry in callback.history] == [4]


def test_loggers_record_the_scores_and_the_samples(tmp_path, wandb_offline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = GenerationEvalCallback(TASK[:2], metrics=["exact_match"], eval_steps=2, max_new_tokens=6)
    train(tmp_path, [callback, WandBCallback(project="gen")], max_steps=4, report_to=["tensorboard"])

    (run,) = read_wandb_runs(wandb_offline)
    for step in (2, 4):
        assert "gen_exact_match" in run.history[step]
        assert (run.history[step]["generations/_type"], run.history[step]["generations/nrows"]) == ("table-file", 2)
    assert "generations/_type" not in run.history[3]
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    texts = events.Tensors("generations/text_summary")
    assert [event.step for event in texts] == [2, 4]
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert f"| 0 | {QUESTION} | {ANSWER} |" in table
    assert any(tag.endswith("gen_exact_match") for tag in events.Tags()["scalars"])


# --- several processes --------------------------------------------------------------------------------------------

WORKER = Path(__file__).with_name("_generation_eval_worker.py")


@pytest.mark.distributed
def test_two_processes_give_the_scores_of_one(tmp_path, tiny_model_dir):
    single = evaluate_in_one_process(tiny_model_dir, tmp_path / "single")
    out = tmp_path / "launch"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(tiny_model_dir), str(out)]
    launch = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert launch.returncode == 0, launch.stdout[-4000:] + launch.stderr[-4000:]
    for rank in (0, 1):
        assert json.loads((out / f"rank{rank}.json").read_text()) == single  # exactly, on every process

    def samples(run: Path) -> list[dict]:
        lines = (run / "run" / "generations" / "step_0.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    assert samples(out) == samples(tmp_path / "single") and len(samples(out)) == EVAL_ROWS
    assert len({sample["scores"]["gen_chars"] for sample in samples(out)}) > 2  # a lost sample would show


# --- command line -------------------------------------------------------------------------------------------------


def test_sft_eval_generate_scores_a_base_model_and_a_trained_run(tmp_path, tiny_model_dir, capsys):
    settings = dict(base_model=str(tiny_model_dir), dataset_name=str(write_jsonl(tmp_path / "train.jsonl", TASK)),
                    eval_dataset_name=str(write_jsonl(tmp_path / "val.jsonl", TASK[:3])), max_seq_length=64,
                    audit_max_duplicate_share=1.0,  # the validation rows repeat training rows on purpose
                    use_lora=False, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, max_steps=12,
                    eval_steps=12, save_steps=12, output_dir=str(tmp_path / "run"), generation_max_new_tokens=8,
                    disable_progress_bar=True)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    assert main(["eval", str(config), "--generate", "--metrics", "exact_match,stopped", "-n", "2"]) == 0
    before = capsys.readouterr().out
    assert "gen_exact_match 0.0000" in before and (tmp_path / "run" / "generations" / "eval_base.jsonl").is_file()
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--generate"]) == 0
    after = capsys.readouterr().out
    assert "gen_exact_match 1.0000" in after and "eval_final.jsonl" in after
    lines = (tmp_path / "run" / "generations" / "eval_final.jsonl").read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in lines] == [ANSWER] * 3

    assert main(["eval", str(config), "--generate", "--metrics", "exact_match,accuracy"]) == 2
    error = capsys.readouterr().err
    assert "unknown generation metric 'accuracy'" in error and "json_valid" in error and "Traceback" not in error
