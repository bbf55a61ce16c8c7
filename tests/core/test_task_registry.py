"""The task registry: built-ins by name, TRL reward functions via module:function, ready Tasks, errors."""

import json
import math
from pathlib import Path

import pytest

from swarmtune.tasks.base import Example, Task, TaskLoadError, columns_of, sample_indices
from swarmtune.tasks.registry import BUILTIN_TASKS, load_task
from tests.support import trl_reward_example
from tests.support.chat_tokenizer import tokenizer

EXAMPLE_MODULE = Path(trl_reward_example.__file__)


@pytest.fixture
def dataset(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"What is {n} + {n}?", "solution": str(2 * n), "level": n % 3} for n in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def batch_reward(task: Task, completions: list[str], examples: list[Example] | None = None) -> list[float]:
    examples = list(task.train())[: len(completions)] if examples is None else examples
    return task.reward([e.prompt for e in examples], completions, **columns_of(examples))


def test_builtin_names():
    assert {"countdown", "conciseness", "math"} <= set(BUILTIN_TASKS)
    assert load_task("countdown", count=10).name == "countdown"
    assert load_task("conciseness").reward_range == (0.0, 1.0)
    assert isinstance(load_task("countdown", count=10), Task)


def test_builtin_options_reach_the_factory():
    plain, chat = load_task("conciseness"), load_task("conciseness", tokenizer=tokenizer())
    assert plain.train()[0].prompt.startswith("User: ")
    assert chat.train()[0].prompt.startswith("<|im_start|>user\n")


def test_trl_reward_function_by_module_name_is_called_unchanged(dataset):
    task = load_task("tests.support.trl_reward_example:accuracy_reward", data=dataset, reward_range=(0, 1))
    examples = list(task.train())[:3]
    completions = [f"The answer is {e.columns['solution']}" for e in examples[:2]] + ["no idea"]
    assert batch_reward(task, completions, examples) == [1.0, 1.0, 0.0]
    assert task.name == "tests.support.trl_reward_example:accuracy_reward" and task.reward_range == (0, 1)


def test_trl_reward_function_by_file_path(dataset):
    task = load_task(f"{EXAMPLE_MODULE}:format_reward", data=dataset, name="fmt")
    assert batch_reward(task, ["Answer: 4", "4"]) == [1.0, 0.0]
    assert task.name == "fmt" and task.reward_range == (-math.inf, math.inf)


def test_reward_function_receives_what_trl_passes(dataset, monkeypatch):
    calls = []

    def spy(prompts, completions, **kwargs):
        calls.append({"prompts": prompts, "completions": completions, **kwargs})
        return [0.5] * len(completions)

    monkeypatch.setattr(trl_reward_example, "spy", spy, raising=False)
    task = load_task("tests.support.trl_reward_example:spy", data=dataset)
    examples = list(task.train())[:2]
    assert batch_reward(task, ["a", "b"], examples) == [0.5, 0.5]
    (call,) = calls
    assert call["prompts"] == [e.prompt for e in examples]
    assert call["completions"] == ["a", "b"]
    assert call["solution"] == [e.columns["solution"] for e in examples]
    assert call["level"] == [e.columns["level"] for e in examples]
    assert "prompt" not in call


def test_conversational_prompts_use_the_chat_template_and_trl_shapes(tmp_path, monkeypatch):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": messages, "solution": "4"}))
    seen = []

    def spy(prompts, completions, **kwargs):
        seen.append((prompts, completions))
        return trl_reward_example.accuracy_reward(prompts, completions, **kwargs)

    monkeypatch.setattr(trl_reward_example, "spy", spy, raising=False)
    chat = load_task("tests.support.trl_reward_example:spy", data=path, held_out_fraction=0.0, tokenizer=tokenizer())
    assert chat.train()[0].prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert batch_reward(chat, ["4"]) == [1.0]
    assert seen == [([messages], [[{"role": "assistant", "content": "4"}]])]
    raw = load_task("tests.support.trl_reward_example:spy", data=path, held_out_fraction=0.0)
    assert raw.train()[0].prompt == "Be brief.\nUser: 2 + 2?\nAssistant:"


def test_string_prompts_are_used_verbatim_even_with_a_chat_template(dataset):
    task = load_task("tests.support.trl_reward_example:accuracy_reward", data=dataset, tokenizer=tokenizer())
    assert all(e.prompt.startswith("What is ") for e in task.train())


def test_held_out_split_is_deterministic_and_disjoint(dataset):
    first = load_task("tests.support.trl_reward_example:accuracy_reward", data=dataset, held_out_fraction=0.25)
    second = load_task("tests.support.trl_reward_example:accuracy_reward", data=dataset, held_out_fraction=0.25)
    assert first.train() == second.train() and first.held_out() == second.held_out()
    assert len(first.held_out()) == 10 and len(first.train()) == 30
    assert not {e.prompt for e in first.train()} & {e.prompt for e in first.held_out()}
    batch = sample_indices(job_seed=1, iteration=5, size=len(first.train()), k=8)
    assert batch == sample_indices(job_seed=1, iteration=5, size=len(second.train()), k=8)


@pytest.mark.parametrize("name", ["countdown", "conciseness"])
def test_split_does_not_depend_on_the_tokenizer(name):
    plain, chat = load_task(name), load_task(name, tokenizer=tokenizer())
    assert [e.columns for e in plain.held_out()] == [e.columns for e in chat.held_out()]
    assert [e.columns for e in plain.train()] == [e.columns for e in chat.train()]
    assert plain.train()[0].prompt != chat.train()[0].prompt


def test_split_does_not_depend_on_row_order(dataset, tmp_path):
    reversed_path = tmp_path / "reversed.jsonl"
    reversed_path.write_text("\n".join(reversed(dataset.read_text().splitlines())))
    forward = load_task("tests.support.trl_reward_example:accuracy_reward", data=dataset)
    backward = load_task("tests.support.trl_reward_example:accuracy_reward", data=reversed_path)
    assert {e.prompt for e in forward.held_out()} == {e.prompt for e in backward.held_out()}


def test_duplicate_rows_never_straddle_the_split(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{n % 5}", "solution": "1"}) for n in range(50)))
    task = load_task("tests.support.trl_reward_example:accuracy_reward", data=path, held_out_fraction=0.1)
    assert not {e.prompt for e in task.train()} & {e.prompt for e in task.held_out()}
    assert len(task.held_out()) == 10  # every copy of the one held-out prompt


def test_explicit_held_out_file(dataset, tmp_path):
    held = tmp_path / "test.jsonl"
    held.write_text(json.dumps({"prompt": "What is 100 + 100?", "solution": "200"}))
    task = load_task("tests.support.trl_reward_example:accuracy_reward", data=dataset, held_out_data=held)
    assert len(task.train()) == 40 and [e.prompt for e in task.held_out()] == ["What is 100 + 100?"]


def test_ready_task_from_a_module_file(tmp_path):
    module = tmp_path / "my_task.py"
    module.write_text(
        "from swarmtune.tasks.base import Example, dataset_task\n"
        "def reward(prompts, completions, **columns):\n"
        "    return [float(len(c)) for c in completions]\n"
        "TASK = dataset_task('lengths', (0.0, 100.0), [Example(f'p{n}') for n in range(10)], reward, 0.2)\n"
    )
    task = load_task(f"{module}:TASK", tokenizer=None)
    assert task.name == "lengths" and len(task.held_out()) == 2
    assert task.reward(["p"], ["abc"]) == [3.0]
    with pytest.raises(TaskLoadError, match="takes no options"):
        load_task(f"{module}:TASK", data="x.jsonl")


@pytest.mark.parametrize(
    ("ref", "options", "message"),
    [
        ("nonsense", {}, "unknown task 'nonsense'"),
        ("no_such_module_xyz:fn", {}, "cannot import 'no_such_module_xyz'"),
        ("tests.support.trl_reward_example:missing", {}, "has no attribute 'missing'"),
        ("tests.support.trl_reward_example:NOT_CALLABLE", {}, "neither a Task nor a reward function"),
        ("tests.support.trl_reward_example:accuracy_reward", {}, "give data=PATH"),
        ("tests.support.trl_reward_example:accuracy_reward", {"data": "/no/such/file.jsonl"}, "not found"),
        ("/no/such/rewards.py:fn", {}, "reward module file not found"),
        (":fn", {}, "expected module:attribute"),
        ("tests.support.trl_reward_example:", {}, "expected module:attribute"),
    ],
)
def test_clear_errors(ref, options, message):
    with pytest.raises(TaskLoadError, match=message):
        load_task(ref, **options)


def test_rows_without_prompt_are_rejected(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q"}))
    with pytest.raises(TaskLoadError, match="row 1 needs a 'prompt'"):
        load_task("tests.support.trl_reward_example:accuracy_reward", data=path)


@pytest.mark.parametrize("bad", [[1.0], [1.0, None], [1.0, float("nan")], "ab"])
def test_reward_function_results_are_checked(dataset, monkeypatch, bad):
    monkeypatch.setattr(trl_reward_example, "bad", lambda prompts, completions, **kw: bad, raising=False)
    task = load_task("tests.support.trl_reward_example:bad", data=dataset)
    with pytest.raises(ValueError, match="tests.support.trl_reward_example:bad"):
        batch_reward(task, ["a", "b"])
