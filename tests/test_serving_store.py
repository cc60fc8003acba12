"""The adapter store and the serving API in one process (no HTTP): an index that reads no weights, answers equal to
`MTLModel.forward` on each text alone from ONE forward per batch, LRU eviction with fusions pinning their adapters,
hot swap between batches, broken and removed exports, and every request mistake as that request's own 4xx."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mtl import model_files, storage
from mtl.errors import MTLConfigError
from mtl.routing import load_router
from mtl.serving.api import MAX_TEXT_BYTES, MAX_TEXTS, AdapterServingAPI, parse_request
from mtl.serving.store import AdapterStore
from mtl.model import MTLModel
from tests.serving_helpers import FUSION, LABELS, TASKS, TEXTS, expected, noisy, retrain, store_model, write_store


@pytest.fixture()
def store_dir(tiny_dir, tmp_path):
    return write_store(tmp_path / "store", tiny_dir)


def _api(store_dir, tiny_dir, max_resident=8) -> AdapterServingAPI:
    store = AdapterStore(store_dir, max_resident)
    api = AdapterServingAPI(str(store_dir), store.snapshot(), str(tiny_dir), max_resident, 3600.0)
    api.setup("cpu")
    return api


def _scores(answer: dict) -> torch.Tensor:
    return torch.tensor([answer["scores"][label] for label in LABELS])


def test_the_index_reads_configs_only_and_a_version_is_known_once_loaded(store_dir, tiny_dir):
    api = _api(store_dir, tiny_dir)
    assert api.model.tasks == [] and api.store.resident_names == ()
    listed = {row["task"]: row for row in api.store.describe()}
    assert sorted(listed) == sorted([*TASKS, FUSION])
    assert listed["t1"]["version"] is None and listed["t1"]["labels"] == LABELS  # no weights read yet
    assert listed["t3"]["adapter"] == "houlsby" and listed[FUSION]["fused"] == ["t0", "t1"]
    sha = storage.file_sha256(store_dir / "adapters" / "t1" / storage.ADAPTER_WEIGHTS)
    assert api.predict([parse_request({"text": TEXTS[0], "task": "t1"})])[0]["version"] == sha[:12]
    assert {row["task"]: row["version"] for row in api.store.describe()}["t1"] == sha[:12]


def test_a_mixed_batch_is_one_forward_and_equals_each_text_alone(store_dir, tiny_dir):
    api = _api(store_dir, tiny_dir)
    calls = []
    forward = api.model.forward
    api.model.forward = lambda *a, **k: calls.append(k.get("row_tasks")) or forward(*a, **k)
    requests = [{"text": TEXTS[0], "task": "t0"}, {"texts": TEXTS[1:4], "task": "t2"}, {"text": TEXTS[4], "task": FUSION},
                {"text": TEXTS[5], "task": "t3"}, {"text": TEXTS[2], "task": "t1"}]
    out = api.predict([parse_request(r) for r in requests])
    assert len(calls) == 1 and sorted(set(calls[0])) == sorted(["t0", "t1", "t2", "t3", FUSION])
    reference, tokenizer = store_model(store_dir, tiny_dir), api.tokenizer
    pairs = [(out[0], TEXTS[0], "t0")] + [(a, t, "t2") for a, t in zip(out[1], TEXTS[1:4])] + \
        [(out[2], TEXTS[4], FUSION), (out[3], TEXTS[5], "t3"), (out[4], TEXTS[2], "t1")]
    for answer, text, task in pairs:
        want = expected(reference, tokenizer, text, task, 8 if task == "t2" else 128)
        assert answer["task"] == task and torch.allclose(_scores(answer), want, atol=1e-5)
        assert answer["label"] == LABELS[int(want.argmax())]
    # t2 truncates at its task's max_length (8 tokens), as in training: the long text answers like its first 8 tokens
    short = tokenizer.decode(tokenizer(TEXTS[2], truncation=True, max_length=8)["input_ids"][1:-1])
    again = api.predict([parse_request({"text": short, "task": "t2"})])[0]
    assert torch.allclose(_scores(again), _scores(out[1][1]), atol=1e-5)


def test_eviction_keeps_at_most_max_resident_and_a_fusion_pins_its_adapters(store_dir, tiny_dir):
    api = _api(store_dir, tiny_dir, max_resident=3)
    reference = store_model(store_dir, tiny_dir)
    api.predict([parse_request({"text": TEXTS[0], "task": FUSION})])
    assert set(api.store.resident_names) == {"t0", "t1", FUSION}
    for task in ["t2", "t3", "t2"]:  # the fusion and its two adapters are pinned only while the fusion is needed
        answer = api.predict([parse_request({"text": TEXTS[1], "task": task})])[0]
        assert torch.allclose(_scores(answer), expected(reference, api.tokenizer, TEXTS[1], task, 32), atol=1e-5)
        assert len(api.store.resident_names) <= 3 and task in api.store.resident_names
    assert FUSION not in api.store.resident_names or {"t0", "t1"} <= set(api.store.resident_names)
    for task in [*TASKS, FUSION]:  # evicted parts load again, with the same answers
        answer = api.predict([parse_request({"text": TEXTS[3], "task": task})])[0]
        assert torch.allclose(_scores(answer), expected(reference, api.tokenizer, TEXTS[3], task, 32), atol=1e-5)
        resident = set(api.store.resident_names)
        assert len(resident) <= 3 and (FUSION not in resident or {"t0", "t1"} <= resident)
    assert sorted(api.model.tasks) == sorted(api.store.resident_names)
    # those answers came in part from evicted parts' modules, refilled (a load evicts first, then builds nothing)
    assert api.store.pool.reused >= 4 and len(api.store.pool) <= 8


def test_a_new_export_is_swapped_in_between_batches_and_answers_say_which_version(store_dir, tiny_dir):
    api = _api(store_dir, tiny_dir)
    old = api.predict([parse_request({"text": TEXTS[0], "task": "t2"})])[0]
    retrain(store_dir, tiny_dir, "t2", seed=99)
    same = api.predict([parse_request({"text": TEXTS[0], "task": "t2"})])[0]  # no rescan yet: still the old version
    assert same == old
    assert api.store.scan() == [f"'t2' version {old['version']} -> "
                                f"{storage.file_sha256(store_dir / 'adapters/t2/adapter.safetensors')[:12]}"]
    new = api.predict([parse_request({"text": TEXTS[0], "task": "t2"})])[0]
    want = expected(store_model(store_dir, tiny_dir), api.tokenizer, TEXTS[0], "t2", 8)
    assert new["version"] != old["version"] and torch.allclose(_scores(new), want, atol=1e-5)

    assert api.predict([parse_request({"text": TEXTS[0], "task": "t9"})])[0].status_code == 404
    model = store_model(store_dir, tiny_dir)
    model.add_task("t9", len(LABELS), labels=LABELS)
    model_files.save_task(model, "t9", store_dir / "adapters")  # a task trained while the server runs
    assert api.store.scan() == [f"new task 't9' version "
                                f"{storage.file_sha256(store_dir / 'adapters/t9/adapter.safetensors')[:12]}"]
    assert api.predict([parse_request({"text": TEXTS[0], "task": "t9"})])[0]["task"] == "t9"


def test_a_broken_export_keeps_the_old_version_and_a_removed_task_goes_after_two_scans(store_dir, tiny_dir):
    api = _api(store_dir, tiny_dir)
    old = api.predict([parse_request({"text": TEXTS[0], "task": "t1"})])[0]
    weights = store_dir / "adapters" / "t1" / storage.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])  # a half-copied file, written in place (not atomically)
    changes = api.store.scan()
    assert len(changes) == 1 and changes[0].startswith(f"kept version {old['version']} of 't1': {weights}: ")
    assert "not a readable safetensors file" in changes[0]
    assert api.store.scan() == []  # reported once
    assert api.predict([parse_request({"text": TEXTS[0], "task": "t1"})])[0] == old
    tensors = storage.read_tensors(store_dir / "adapters" / "t0" / storage.ADAPTER_WEIGHTS)
    tensors["head.out.bias"][0] = float("nan")  # a complete file whose values loading refuses
    save_file(tensors, str(weights))
    changes = api.store.scan()
    assert len(changes) == 1 and changes[0].startswith(f"kept version {old['version']} of 't1'") and "head.out.bias" in changes[0]
    assert api.predict([parse_request({"text": TEXTS[0], "task": "t1"})])[0] == old
    shutil.rmtree(store_dir / "adapters" / "t3")
    assert api.store.scan() == [] and "t3" in api.store.snapshot()  # a moment's absence is an overwrite in flight
    assert api.store.scan() == ["'t3' removed from the store"]
    gone = api.predict([parse_request({"text": TEXTS[0], "task": "t3"})])[0]
    assert gone.status_code == 404 and b"unknown task 't3'" in gone.body


def test_the_store_router_answers_task_less_texts_as_routing_then_forward_would(store_dir, tiny_dir):
    api = _api(store_dir, tiny_dir)
    out = api.predict([parse_request({"texts": TEXTS[:4]}), parse_request({"text": TEXTS[4], "task": "t0"})])
    reference, router = store_model(store_dir, tiny_dir), load_router(store_dir / "router")
    batch = api.tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    chosen = router.route(reference, batch["input_ids"], batch["attention_mask"])
    assert [a["task"] for a in out[0]] == chosen and all(a["routed"] for a in out[0])
    for answer, text in zip(out[0], TEXTS):
        length = 8 if answer["task"] == "t2" else 32
        assert torch.allclose(_scores(answer), expected(reference, api.tokenizer, text, answer["task"], length), atol=1e-5)
    assert "routed" not in out[1]


@pytest.mark.parametrize("request_body, status, message", [
    ([1], 400, "body is a JSON list, expected an object"),
    ({"task": "t0"}, 400, "give exactly one of 'text' (a string) or 'texts' (a list of strings)"),
    ({"text": "a", "texts": ["b"]}, 400, "give exactly one of"),
    ({"text": "   "}, 400, "text: got '   ', expected a non-empty string"),
    ({"text": 5}, 400, "text: got '5', expected a string, a question about a context"),
    ({"texts": []}, 400, "texts: got '[]', expected a non-empty list of strings"),
    ({"texts": ["ok", None]}, 400, "texts[1]: got 'None', expected a string, a question about a context"),
    ({"texts": ["x"] * 10_000}, 400, f"texts: 10000 texts, expected at most {MAX_TEXTS} per request"),
    ({"text": "é" * (MAX_TEXT_BYTES // 2 + 1)}, 413, f"text: {MAX_TEXT_BYTES + 2:,} bytes, expected at most"),
    ({"text": "a", "task": 3}, 400, "task: got '3', expected a task name (a string)"),
    ({"text": "a", "label": "x"}, 400, "unknown key(s) ['label'], expected 'text' or 'texts', and 'task'"),
    ({"texts": ["ok", "bad \ud800 half"]}, 400, "texts[1]: holds a lone surrogate U+D800 at character 5"),
])
def test_each_request_mistake_is_its_own_one_line_answer(request_body, status, message):
    refusal = parse_request(request_body).refusal
    body = json.loads(refusal.body)
    assert refusal.status_code == status and message in body["error"] and "\n" not in body["error"]


def test_bad_requests_in_a_batch_leave_the_others_answered(store_dir, tiny_dir):
    api = _api(store_dir, tiny_dir)
    out = api.predict([parse_request({"text": ""}), parse_request({"text": "a", "task": "nope"}),
                       parse_request({"text": TEXTS[0], "task": "t0"})])
    assert [getattr(o, "status_code", 200) for o in out] == [400, 404, 200] and out[2]["task"] == "t0"


def test_a_part_the_store_refuses_is_a_503_naming_why_and_the_batch_is_answered(store_dir, tiny_dir):
    shutil.copytree(store_dir / "adapters" / "t1", store_dir / "adapters" / "t1_copy")  # its config still says t1
    tensors = storage.read_tensors(store_dir / "adapters" / "t2" / storage.ADAPTER_WEIGHTS)
    tensors["head.out.bias"][0] = float("nan")  # found at the first load: the index reads no weights
    save_file(tensors, str(store_dir / "adapters" / "t2" / storage.ADAPTER_WEIGHTS))
    api = _api(store_dir, tiny_dir)
    out = api.predict([parse_request({"text": TEXTS[0], "task": task}) for task in ["t1", "t2", "t0"]])
    assert [getattr(o, "status_code", 200) for o in out] == [503, 503, 200]
    ambiguous, nan = json.loads(out[0].body)["error"], json.loads(out[1].body)["error"]
    assert "exported in 2 folders" in ambiguous and "adapters/t1_copy" in ambiguous and "head.out.bias" in nan


def test_a_store_that_cannot_be_served_is_one_line(tmp_path, store_dir):
    with pytest.raises(MTLConfigError, match=r"serve.store: .*nowhere: not a folder"):
        AdapterStore(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MTLConfigError, match="no exported task found"):
        AdapterStore(tmp_path / "empty")
    two = tmp_path / "two"
    for run in ("a", "b"):
        shutil.copytree(store_dir / "adapters", two / run / "adapters")
    with pytest.raises(MTLConfigError, match=r"no servable export \(not serving 't0': exported in 2 folders"):
        AdapterStore(two)  # every name in two folders: nothing left to serve
    with pytest.raises(MTLConfigError, match="serve.max_resident: got 0"):
        AdapterStore(store_dir, 0)



def test_the_folders_stamp_moves_with_an_export_and_stays_put_otherwise(store_dir, tiny_dir):
    store = AdapterStore(store_dir, 8)
    before = store.folders_stamp()
    assert store.folders_stamp() == before
    (store_dir / "adapters" / "t1" / "adapter.safetensors").touch()  # in place: only a full scan sees it
    assert store.folders_stamp() == before
    retrain(store_dir, tiny_dir, "t2", seed=5)  # what a new fit's export does
    assert store.folders_stamp() != before


def test_a_batch_mixing_a_tagger_and_classifiers_is_one_forward_and_each_answer_equals_its_text_alone(store_dir,
                                                                                                        tiny_dir):
    from mtl.kinds.word_windows import encode_words, split_words

    tags = ["O", "B-KEY", "I-KEY"]
    model = MTLModel(str(tiny_dir))
    model.add_task("tag", 3, problem="token_classification", pooling="none", labels=tags,
                   spec={"max_length": 6, "doc_stride": 2})
    noisy(model, "tag", 7)
    model_files.save_task(model, "tag", store_dir / "adapters")
    api = _api(store_dir, tiny_dir)
    calls = []
    forward = api.model.forward
    api.model.forward = lambda *a, **k: calls.append(k.get("row_tasks")) or forward(*a, **k)
    long = "alpha, river stone (green) cloud seven table beta delta"  # 12 words: windows of at most 4
    requests = [{"text": TEXTS[0], "task": "t0"}, {"texts": [long, TEXTS[3]], "task": "tag"}, {"text": TEXTS[1],
                                                                                                "task": "t1"}]
    out = api.predict([parse_request(r) for r in requests])
    windows = encode_words(api.tokenizer, split_words(long)[0], None, 6, 2)
    assert len(calls) == 1 and calls[0].count("tag") == len(windows) + 1 > 3  # the long text is several rows
    for answer, text, task in ((out[0], TEXTS[0], "t0"), (out[2], TEXTS[1], "t1")):
        assert torch.allclose(_scores(answer), expected(store_model(store_dir, tiny_dir), api.tokenizer, text, task,
                                                         32), atol=1e-5)
    model.eval()
    for answer, text in zip(out[1], [long, TEXTS[3]]):
        words, offsets = split_words(text)
        assert answer["words"] == words and len(answer["label"]) == len(words)
        for window in encode_words(api.tokenizer, words, None, 6, 2):  # each word from the window that owns it
            ids = torch.tensor([window.input_ids])
            with torch.no_grad():
                probs = model(ids, torch.ones_like(ids), tasks="tag")["tag"][0].softmax(-1)
            for word, position in window.owned:
                assert answer["label"][word] == tags[int(probs[position].argmax())]
                assert abs(answer["score"][word] - float(probs[position].max())) < 1e-5
        for entity in answer["entities"]:
            assert entity["text"] == text[entity["start"]:entity["end"]]
        alone = api.predict([parse_request({"text": text, "task": "tag"})])[0]
        assert alone["label"] == answer["label"] and max(abs(a - b) for a, b in zip(alone["score"],
                                                                                   answer["score"])) < 1e-5


def test_a_no_answer_task_answers_no_answer_by_the_threshold_in_its_saved_spec(store_dir, tiny_dir):
    from mtl.backbone import load_tokenizer
    from mtl.kinds.extractive_qa import best_spans, windows

    model = MTLModel(str(tiny_dir))
    for task in ("qa_below", "qa_above"):  # the same weights, thresholds either side of the question's diff
        model.add_task(task, 2, problem="extractive_qa", pooling="none", labels=[])
    noisy(model, "qa_below", 5)
    with torch.no_grad():
        for p, q in zip(model.task_parameters("qa_below").values(), model.task_parameters("qa_above").values()):
            q.copy_(p)
    model.eval()
    context = "alpha river stone green cloud seven table beta delta gamma red blue pink river stone cloud"
    question = {"question": "which colour?", "context": context}
    span, null = float("-inf"), float("inf")
    for _, inputs, offsets in windows(load_tokenizer(str(tiny_dir)), [question["question"]], [context], 16, 4):
        ids = torch.tensor([inputs["input_ids"]])
        with torch.no_grad():
            logits = model(ids, torch.ones_like(ids), torch.tensor([inputs["token_type_ids"]]), tasks="qa_below")
        span = max(span, float(best_spans(logits["qa_below"], torch.tensor([offsets]))[2]))
        null = min(null, float(logits["qa_below"][0, 0, 0] + logits["qa_below"][0, 0, 1]))
    for task, threshold in (("qa_below", null - span - 0.5), ("qa_above", null - span + 0.5)):
        model.records[task].spec = {"max_length": 16, "doc_stride": 4, "no_answer": True,
                                    "no_answer_threshold": threshold}
        model_files.save_task(model, task, store_dir / "adapters")
    api = _api(store_dir, tiny_dir)
    empty, found = api.predict([parse_request({"text": question, "task": "qa_below"}),
                                parse_request({"text": question, "task": "qa_above"})])
    assert (empty["label"], empty["start"], empty["end"], empty["no_answer"]) == ("", None, None, True)
    assert found["no_answer"] is False and found["label"] == context[found["start"]:found["end"]] != ""


def test_a_question_about_a_long_context_shares_the_one_forward_and_answers_as_its_windows_alone(store_dir, tiny_dir):
    from mtl.kinds.extractive_qa import best_spans, windows

    model = MTLModel(str(tiny_dir))
    model.add_task("qa", 2, problem="extractive_qa", pooling="none", labels=[],
                   spec={"max_length": 16, "doc_stride": 4})
    noisy(model, "qa", 5)
    model_files.save_task(model, "qa", store_dir / "adapters")
    api = _api(store_dir, tiny_dir)
    calls = []
    forward = api.model.forward
    api.model.forward = lambda *a, **k: calls.append(k.get("row_tasks")) or forward(*a, **k)
    context = "alpha river  stone green cloud seven table beta delta gamma red blue pink river stone cloud"
    question = {"question": "which colour?", "context": context}
    out = api.predict([parse_request({"text": TEXTS[0], "task": "t0"}), parse_request({"text": question, "task": "qa"})])
    parts = windows(api.tokenizer, [question["question"]], [context], 16, 4)
    assert len(calls) == 1 and calls[0].count("qa") == len(parts) > 1  # every window in the one forward
    assert torch.allclose(_scores(out[0]), expected(store_model(store_dir, tiny_dir), api.tokenizer, TEXTS[0], "t0",
                                                    32), atol=1e-5)
    model.eval()
    best = None
    for _, inputs, offsets in parts:  # each window alone: its best span; the answer is the best of them
        ids = torch.tensor([inputs["input_ids"]])
        with torch.no_grad():
            logits = model(ids, torch.ones_like(ids), torch.tensor([inputs["token_type_ids"]]), tasks="qa")["qa"]
        start, end, score = best_spans(logits, torch.tensor([offsets]))
        probs = logits[0].softmax(0)
        span = (float(score), offsets[int(start)][0], offsets[int(end)][1], float(probs[start, 0] * probs[end, 1]))
        best = span if best is None or span[0] > best[0] else best
    answer = out[1]
    assert (answer["start"], answer["end"]) == best[1:3] and answer["label"] == context[best[1]:best[2]]
    assert abs(answer["score"] - best[3]) < 1e-5 and answer["task"] == "qa"
    alone = api.predict([parse_request({"text": question, "task": "qa"})])[0]
    assert (alone["label"], alone["start"]) == (answer["label"], answer["start"])
    assert abs(alone["score"] - answer["score"]) < 1e-5
    # a text the task cannot read is that request's own 400; the others are answered
    long_question = {"question": " ".join(["which"] * 20), "context": context}
    out = api.predict([parse_request(body) for body in (
        {"text": "which colour?", "task": "qa"}, {"text": question, "task": "t0"}, {"text": question},
        {"text": long_question, "task": "qa"}, {"text": question, "task": "qa"})])
    errors = [json.loads(o.body)["error"] if hasattr(o, "status_code") else None for o in out]
    assert "expected {question, context}: an extractive_qa task answers a question about a context" in errors[0]
    assert "expected a string: a classification task reads one text" in errors[1]
    assert "a question needs 'task'" in errors[2]
    assert "the question 'which which which which which '... is 20 tokens; with max_length 16 and doc_stride 4" \
        in errors[3]
    assert errors[4] is None and out[4]["label"] == answer["label"]


def test_a_question_with_choices_shares_the_one_forward_and_answers_as_its_choices_alone(store_dir, tiny_dir):
    from mtl.kinds.multiple_choice import pairs

    model = MTLModel(str(tiny_dir))
    model.add_task("choice", 1, problem="multiple_choice", labels=["A", "B", "C"], spec={"max_length": 16})
    noisy(model, "choice", 6)
    model_files.save_task(model, "choice", store_dir / "adapters")
    api = _api(store_dir, tiny_dir)
    calls = []
    forward = api.model.forward
    api.model.forward = lambda *a, **k: calls.append(k.get("row_tasks")) or forward(*a, **k)
    three = {"context": "a stone by the river", "question": "which colour?", "choices": ["red", "table", "cloud"]}
    two = {"question": "which colour?", "choices": ["seven", "pink"]}  # any count >= 2 is answered
    out = api.predict([parse_request({"text": TEXTS[0], "task": "t0"}),
                       parse_request({"texts": [three, two], "task": "choice"})])
    assert len(calls) == 1 and calls[0].count("choice") == 5  # a row per choice, all in the one forward
    assert torch.allclose(_scores(out[0]), expected(store_model(store_dir, tiny_dir), api.tokenizer, TEXTS[0], "t0",
                                                    32), atol=1e-5)
    model.eval()
    for answer, question in zip(out[1], (three, two)):
        scores = []
        for first, second in pairs(question["question"], question["choices"], question.get("context", "")):
            enc = api.tokenizer(first, second, return_tensors="pt")
            with torch.no_grad():  # each choice alone
                scores.append(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                                    tasks="choice")["choice"][0, 0])
        probs = torch.stack(scores).softmax(0)
        assert answer["choice"] == int(probs.argmax()) and answer["label"] == question["choices"][answer["choice"]]
        assert max(abs(a - b) for a, b in zip(answer["scores"], probs.tolist())) < 1e-5
    out = api.predict([parse_request(body) for body in (
        {"text": three, "task": "qa"}, {"text": "which colour?", "task": "choice"},
        {"text": {"question": "q", "context": "c"}, "task": "choice"}, {"text": three})])
    errors = [json.loads(o.body)["error"] for o in out]
    assert "expected {question, context}: an extractive_qa task answers" in errors[0] or "unknown task" in errors[0]
    assert "expected {question, choices} (and an optional context): a multiple_choice task picks" in errors[1]
    assert "expected {question, choices}" in errors[2] and "a question needs 'task'" in errors[3]


@pytest.mark.parametrize("request_body, message", [
    ({"text": {"question": "q"}}, "text: got keys ['question'], expected a string, a question about a context "
                                  "{question, context}, or a question with answer choices {question, choices[, "
                                  "context]}"),
    ({"text": {"question": "q", "choices": ["a"]}}, "text.choices: got ['a'], expected a list of at least 2"),
    ({"text": {"question": "q", "choices": ["a", 2]}}, "text.choices[1]: got '2', expected a string"),
    ({"text": {"question": " ", "context": "c"}}, "text.question: got ' ', expected a non-empty string"),
    ({"texts": [{"question": "q", "context": 3}]}, "texts[0].context: got '3', expected a non-empty string"),
])
def test_a_malformed_question_is_its_requests_own_400(request_body, message):
    refusal = parse_request(request_body).refusal
    assert refusal.status_code == 400 and message in json.loads(refusal.body)["error"]
