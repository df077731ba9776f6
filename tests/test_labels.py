"""The pairs file, the label store (resume, mapping back the screen order, agreement, export) and the
labelling app's guards, without a browser."""

import json

import pytest

from rlhf.data.pairs import PairsError, pair_id, read_pairs
from rlhf.data.validation import read_dataset
from rlhf.labeling.app import LabelingSession, check_host, create_app
from rlhf.labeling.labels import (
    LabelsError,
    LabelStore,
    cohen_kappa,
    export_preferences,
    next_pair,
    read_labels,
    screen_order,
    summary,
)
from tests.conftest import rlhf


def write_pairs(path, count=6):
    rows = [{"pair_id": f"p{i}", "input_text": f"Post number {i} about a noisy neighbour.",
             "candidate_0": f"Short summary {i}.", "candidate_1": f"A longer summary of post {i}."}
            for i in range(1, count + 1)]
    rows[1] = {"pair_id": "p2", "messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "My cat ran away."}],
               "candidate_0": "Your cat left.", "candidate_1": "A cat is missing.", "source": "x.jsonl:2",
               "generation": {"ended": [True, False]}}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_pairs(str(path))


def test_pairs_get_a_content_id_when_they_have_none(tmp_path):
    row = {"input_text": "a post", "candidate_0": "one", "candidate_1": "two"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [pair] = read_pairs(str(path))
    assert pair["pair_id"] == pair_id(row) and len(pair["pair_id"]) == 12
    assert pair_id({**row, "candidate_1": "three"}) != pair["pair_id"]


def test_bad_pair_rows_are_reported_by_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"pair_id": "a", "input_text": "t", "candidate_0": "x", "candidate_1": "y"}
    path.write_text("\n".join([
        json.dumps(good),
        "not json",
        json.dumps({**good, "pair_id": "b", "choice": 1}),
        json.dumps({"pair_id": "c", "input_text": "t", "candidate_0": "x"}),
        json.dumps({**good, "pair_id": "d", "candidate_1": " x "}),
        json.dumps(good),
    ]) + "\n")
    with pytest.raises(PairsError) as caught:
        read_pairs(str(path))
    lines = [str(p) for p in caught.value.problems]
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "unexpected key 'choice'" in lines[1]
    assert "missing key 'candidate_1'" in lines[2]
    assert "the same text" in lines[3]
    assert f"already used at {path}:1" in lines[4]
    with pytest.raises(PairsError) as missing:
        read_pairs(str(tmp_path / "nope.jsonl"))
    assert str(missing.value.problems[0]) == f"{tmp_path / 'nope.jsonl'}:0: file not found"


def test_each_label_is_on_disk_before_record_returns_and_resume_skips_decided_pairs(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    path = tmp_path / "labels.jsonl"
    store = LabelStore(path)
    assert next_pair(pairs, store.labels, "ana") == 0
    store.record("p1", "ana", 1, 0)
    line = json.loads(path.read_text().splitlines()[-1])
    assert line == {"pair_id": "p1", "annotator": "ana", "choice": 1, "left": 0, "time": line["time"]}
    store.record("p2", "ana", None, 1)
    assert json.loads(path.read_text().splitlines()[-1])["skipped"] is True
    store.record("p4", "ana", 0, 0)
    store.record("p3", "bob", 0, 1)
    # Killed here: nothing was closed, yet a fresh reader sees every label.
    labels = read_labels(path)
    assert [(label.pair_id, label.annotator, label.choice) for label in labels] == [
        ("p1", "ana", 1), ("p2", "ana", None), ("p4", "ana", 0), ("p3", "bob", 0)]
    assert next_pair(pairs, labels, "ana") == 2  # p3: p1 chosen on, p2 skipped
    assert next_pair(pairs, labels, "bob") == 0
    store.close()
    reopened = LabelStore(path)
    assert len(reopened.labels) == 4
    reopened.close()


def test_a_hand_edited_file_without_final_newline_keeps_its_last_label(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"pair_id": "p1", "annotator": "ana", "choice": 0, "left": 1, "time": "t"}))
    store = LabelStore(path)
    store.record("p2", "ana", 1, 0)
    store.close()
    assert [label.pair_id for label in read_labels(path)] == ["p1", "p2"]


def test_bad_label_lines_are_reported_by_file_and_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"pair_id": "p1", "annotator": "ana", "choice": 0, "left": 1, "time": "t"}) + "\n"
                    + json.dumps({"pair_id": "p2", "annotator": "ana", "choice": 2, "left": 0, "time": "t"}) + "\n"
                    + '{"pair_id": "p3", "annotator": "an\n')
    with pytest.raises(LabelsError) as caught:
        read_labels(path)
    assert [str(p).split(": ", 1)[0] for p in caught.value.problems] == [f"{path}:2", f"{path}:3"]


def test_screen_order_is_fixed_per_pair_and_annotator_and_both_orders_occur():
    orders = [screen_order(f"pair-{i}", "ana") for i in range(200)]
    assert orders == [screen_order(f"pair-{i}", "ana") for i in range(200)]
    assert set(orders) == {(0, 1), (1, 0)}
    assert 70 < orders.count((1, 0)) < 130
    assert any(screen_order(f"pair-{i}", "bob") != orders[i] for i in range(200))


def test_a_pick_on_screen_is_mapped_back_to_the_stored_candidate(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    session = LabelingSession(pairs, LabelStore(tmp_path / "labels.jsonl"), "ana")
    for pair in pairs[:4]:
        shown = session.state()["pair"]
        assert shown["pair_id"] == pair["pair_id"]
        left, right = screen_order(pair["pair_id"], "ana")
        assert shown["left"]["text"] == pair[f"candidate_{left}"]
        assert shown["right"]["text"] == pair[f"candidate_{right}"]
        session.decide(pair["pair_id"], "right")
    assert [label.choice for label in session.store.labels] == [screen_order(p["pair_id"], "ana")[1] for p in pairs[:4]]
    assert [label.left for label in session.store.labels] == [screen_order(p["pair_id"], "ana")[0] for p in pairs[:4]]
    state = session.decide(pairs[4]["pair_id"], "skip")
    assert state["chosen"] == 4 and state["skipped"] == 1 and state["pair"]["pair_id"] == "p6"
    assert session.store.labels[-1].choice is None


def test_the_page_marks_a_candidate_cut_at_the_length_limit(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    session = LabelingSession(pairs, LabelStore(tmp_path / "labels.jsonl"), "ana")
    session.decide("p1", "left")
    shown = session.state()["pair"]
    assert shown["messages"][-1]["content"] == "My cat ran away."
    left, right = screen_order("p2", "ana")
    assert (shown["left"]["cut"], shown["right"]["cut"]) == (left == 1, right == 1)


def labelled_example(tmp_path):
    """Three annotators on six pairs; the expected numbers are worked out by hand in the test below."""
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    store = LabelStore(tmp_path / "labels.jsonl")
    for pair, ana, bob in (("p1", 0, 0), ("p2", 0, 0), ("p3", 0, 0), ("p4", 1, 1), ("p5", None, 1)):
        store.record(pair, "ana", ana, 0)
        store.record(pair, "bob", bob, 1)
    store.record("p2", "ana", 1, 0)  # ana changes her mind: the last decision counts
    store.record("p1", "cy", 1, 0)
    store.record("p9", "cy", 1, 0)  # a pair of another pairs file
    return pairs, store


def test_agreement_and_kappa_on_a_hand_made_example(tmp_path):
    pairs, store = labelled_example(tmp_path)
    report = summary(pairs, store.labels)
    assert report["annotators"] == {"ana": {"chosen": 4, "skipped": 1, "remaining": 1},
                                    "bob": {"chosen": 5, "skipped": 0, "remaining": 1},
                                    "cy": {"chosen": 1, "skipped": 0, "remaining": 5}}
    # Chosen on by two or more: p1 (0, 0, 1), p2 (1, 0), p3 (0, 0), p4 (1, 1); all agree on p3 and p4.
    assert report["agreement"]["pairs_with_several_annotators"] == 4
    assert report["agreement"]["all_agree_share"] == 0.5
    # ana [0, 1, 0, 1] vs bob [0, 0, 0, 1]: observed 3/4, chance 0.5 * 0.25 + 0.5 * 0.75 = 0.5, kappa 0.5.
    assert report["agreement"]["pairwise"] == [
        {"annotators": ["ana", "bob"], "shared_pairs": 4, "agreement": 0.75, "cohen_kappa": 0.5},
        {"annotators": ["ana", "cy"], "shared_pairs": 1, "agreement": 0.0, "cohen_kappa": 0.0},
        {"annotators": ["bob", "cy"], "shared_pairs": 1, "agreement": 0.0, "cohen_kappa": 0.0}]
    assert report["labels_of_unknown_pairs"] == 1
    # Left was 0 for ana and cy, 1 for bob: left chosen by ana on p1, p3 (0) and cy never, bob on p4, p5 (1).
    assert report["position"] == {"choices": 10, "left_chosen_share": 0.4}
    assert cohen_kappa([0, 0, 0], [0, 0, 0]) is None
    assert cohen_kappa([0, 1, 0, 1], [0, 1, 0, 1]) == 1.0


def test_export_takes_the_majority_leaves_ties_out_and_passes_validation(tmp_path):
    pairs, store = labelled_example(tmp_path)
    rows, counts = export_preferences(pairs, store.labels)
    assert counts == {"rows": 4, "unanimous": 3, "by_majority": 1, "ties_left_out": 1, "not_chosen_on": 1}
    by_prompt = {pair["pair_id"]: pair for pair in pairs}
    expected = [("p1", 0), ("p3", 0), ("p4", 1), ("p5", 1)]
    assert rows == [{"input_text": by_prompt[p]["input_text"], "candidate_0": by_prompt[p]["candidate_0"],
                     "candidate_1": by_prompt[p]["candidate_1"], "choice": c} for p, c in expected]
    path = tmp_path / "preference.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = read_dataset(str(path), "preference")
    assert dataset.problems == [] and len(dataset.rows) == 4


def test_a_messages_pair_exports_its_messages(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    store = LabelStore(tmp_path / "labels.jsonl")
    store.record("p2", "ana", 1, 0)
    rows, _ = export_preferences(pairs, store.labels)
    assert rows == [{"messages": pairs[1]["messages"], "candidate_0": "Your cat left.",
                     "candidate_1": "A cat is missing.", "choice": 1}]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "labels.example.com"])
def test_serving_beyond_loopback_is_refused_unless_asked(host):
    with pytest.raises(ValueError, match="--allow-remote"):
        check_host(host, allow_remote=False)
    check_host(host, allow_remote=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_is_served(host):
    check_host(host, allow_remote=False)


def test_the_app_refuses_other_host_names_and_form_posts(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    session = LabelingSession(pairs, LabelStore(tmp_path / "labels.jsonl"), "ana")
    client = create_app(session, loopback_only=True).test_client()
    assert client.get("/api/state", headers={"Host": "127.0.0.1:8765"}).json["pair"]["pair_id"] == "p1"
    assert client.get("/api/state", headers={"Host": "attacker.example:8765"}).status_code == 403
    assert client.post("/api/label", data={"pair_id": "p1", "pick": "left"},
                       headers={"Host": "localhost:8765"}).status_code == 415
    assert client.post("/api/label", json={"pair_id": "nope", "pick": "left"},
                       headers={"Host": "localhost:8765"}).status_code == 404
    assert client.post("/api/label", json={"pair_id": "p1", "pick": "up"},
                       headers={"Host": "localhost:8765"}).status_code == 400
    assert session.store.labels == []
    answer = client.post("/api/label", json={"pair_id": "p1", "pick": "left"}, headers={"Host": "[::1]:8765"})
    assert answer.status_code == 200 and answer.json["pair"]["pair_id"] == "p2"
    assert session.store.labels[0].choice == screen_order("p1", "ana")[0]


def test_cli_refuses_a_remote_host_and_bad_pairs_without_traceback(tmp_path):
    write_pairs(tmp_path / "pairs.jsonl")
    labels = tmp_path / "labels.jsonl"
    refused = rlhf("label", "--pairs", str(tmp_path / "pairs.jsonl"), "--output", str(labels), "--annotator", "ana",
                   "--host", "0.0.0.0")
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr and "Traceback" not in refused.stderr
    assert not labels.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_text": "t", "candidate_0": "x"}\n')
    broken = rlhf("label", "--pairs", str(bad), "--output", str(labels))
    assert broken.returncode == 2 and f"{bad}:1: missing key 'candidate_1'" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_cli_stats_and_export_refusing_to_overwrite(tmp_path):
    pairs, store = labelled_example(tmp_path)
    store.close()
    base = ["label", "--pairs", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "labels.jsonl")]
    stats = rlhf(*base, "--stats")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["agreement"]["all_agree_share"] == 0.5
    out = tmp_path / "preference.jsonl"
    exported = rlhf(*base, "--export", str(out))
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["export"]["ties_left_out"] == 1
    assert len(read_dataset(str(out), "preference").rows) == 4
    again = rlhf(*base, "--export", str(out))
    assert again.returncode == 2 and "exists" in again.stderr
    missing = rlhf("label", "--pairs", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "no.jsonl"),
                   "--stats")
    assert missing.returncode == 2 and "no labels file" in missing.stderr
