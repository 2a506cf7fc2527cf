"""Task samplers (ranges, class splits, seeded and exactly resumable) and bad task input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bilevel.meta as M
from bilevel.errors import ConfigError, StructureMismatchError

F64 = torch.float64


def test_sinusoid_tasks_follow_the_maml_distribution_and_resume_exactly():
    s = M.SinusoidTasks(shots=5, queries=7, seed=11, dtype=F64)
    b = s.next(400)
    assert b["support_x"].shape == (400, 5, 1) and b["query_y"].shape == (400, 7, 1)
    x = torch.cat([b["support_x"], b["query_x"]], 1)[..., 0]
    y = torch.cat([b["support_y"], b["query_y"]], 1)[..., 0]
    assert float(x.min()) >= -5 and float(x.max()) <= 5
    # recover (A, φ) from two points per task: y = A sin(x − φ) = a sin x − c cos x
    M2 = torch.stack([torch.sin(x[:, :2]), -torch.cos(x[:, :2])], -1)
    ac = torch.linalg.solve(M2, y[:, :2])
    amp = ac.norm(dim=-1)
    phase = torch.atan2(ac[:, 1], ac[:, 0])
    assert float(amp.min()) >= 0.1 - 1e-9 and float(amp.max()) <= 5 + 1e-9
    assert float(phase.min()) >= -1e-9 and float(phase.max()) <= math.pi + 1e-9
    pred = amp[:, None] * torch.sin(x - phase[:, None])
    torch.testing.assert_close(pred, y, rtol=1e-8, atol=1e-8)  # all 12 points on that sinusoid
    # resume: a fresh sampler loaded with the state continues the same sequence
    s2 = M.SinusoidTasks(shots=5, queries=7, seed=11, dtype=F64)
    s.next(3)
    st = s.state_dict()
    nxt = s.next(2)
    s2.load_state_dict(st)
    nxt2 = s2.next(2)
    assert all(torch.equal(nxt[k], nxt2[k]) for k in nxt)


def _toy_data(n_classes=6, per=8, dim=3):
    labels = np.repeat(np.arange(n_classes), per)
    inputs = torch.arange(len(labels) * dim, dtype=F64).reshape(len(labels), dim)
    return inputs, labels


def test_episodes_use_only_their_classes_and_resume():
    inputs, labels = _toy_data()
    train, test = M.class_split(labels)
    assert train == [0, 1, 2] and test == [3, 4, 5] and not set(train) & set(test)
    ep = M.Episodes(inputs, labels, test, ways=3, shots=2, queries=3, seed=5)
    b = ep.next(20)
    assert b["support_x"].shape == (20, 6, 3) and b["query_x"].shape == (20, 9, 3)
    assert torch.equal(b["support_y"][0], torch.tensor([0, 0, 1, 1, 2, 2]))
    row = (b["support_x"][..., 0] / 3).long()  # index of each example in `inputs`
    qrow = (b["query_x"][..., 0] / 3).long()
    for t in range(20):
        used = np.asarray(labels[row[t]])
        assert set(used) <= set(test)
        for k in range(3):  # one original class per new label, never shared with the query rows
            assert len(set(labels[row[t][b["support_y"][t] == k]])) == 1
        assert not set(row[t].tolist()) & set(qrow[t].tolist())
    st = ep.state_dict()
    again = ep.next(4)
    ep2 = M.Episodes(inputs, labels, test, ways=3, shots=2, queries=3, seed=5)
    ep2.load_state_dict(st)
    again2 = ep2.next(4)
    assert all(torch.equal(again[k], again2[k]) for k in again)
    with pytest.raises(ConfigError, match="seed"):
        M.Episodes(inputs, labels, test, ways=3, shots=2, queries=3, seed=6).load_state_dict(st)


def test_episode_configuration_errors():
    inputs, labels = _toy_data()
    with pytest.raises(ConfigError, match="ways=4 but the data split has only 3 classes"):
        M.Episodes(inputs, labels, [0, 1, 2], ways=4, shots=1)
    with pytest.raises(ConfigError, match="support set of size 0"):
        M.Episodes(inputs, labels, [0, 1, 2], ways=2, shots=0)
    with pytest.raises(ConfigError, match="class 0 .* 8 examples"):
        M.Episodes(inputs, labels, [0, 1, 2], ways=2, shots=5, queries=5)


def _task(n_s=4, n_q=3, dim=2, ways=2):
    return {"support_x": torch.zeros(n_s, dim, dtype=F64), "support_y": torch.arange(n_s) % ways,
            "query_x": torch.zeros(n_q, dim, dtype=F64), "query_y": torch.arange(n_q) % ways}


def test_bad_task_batches_name_the_task_and_the_field():
    with pytest.raises(StructureMismatchError, match="task 2: field 'support_x' has shape \\(5, 2\\)"):
        M.stack_tasks([_task(), _task(), _task(n_s=5)])
    with pytest.raises(StructureMismatchError, match="task 1: the support set is empty"):
        M.stack_tasks([_task(), _task(n_s=0)])
    batch = M.stack_tasks([_task(), _task()])
    batch["query_y"] = batch["query_y"][:1]
    with pytest.raises(StructureMismatchError, match="different numbers of tasks"):
        M.check_tasks(batch)
    with pytest.raises(StructureMismatchError, match="missing fields \\['query_y'\\]"):
        M.check_tasks([{k: v for k, v in _task().items() if k != "query_y"}])


def test_head_and_labels_must_match_the_ways():
    with pytest.raises(ConfigError, match="head has 3 outputs but the tasks are 5-way"):
        M.MAML(M.MLPModel([2, 4], 3), ways=5)
    L = M.MAML(M.MLPModel([2, 4], 2), ways=2, steps=1)
    x = L.init(dtype=F64)
    bad = M.stack_tasks([_task(), _task(ways=3)])
    with pytest.raises(StructureMismatchError, match="task 1: field 'support_y' has label 2 .*2-way"):
        L.meta_grad(x, bad)
    P = M.ProtoNet(M.MLPModel([2, 4], 2), ways=3)
    with pytest.raises(StructureMismatchError, match="task 0: field 'support_y' has no example of "
                                                     "class 2"):
        P.meta_grad(P.init(dtype=F64), M.stack_tasks([_task(ways=2)]))
    class Unbatchable(M.MAML):
        vmappable = False

    with pytest.raises(ConfigError, match="Unbatchable cannot be vmapped"):
        Unbatchable(M.MLPModel([2, 4], 2), ways=2).meta_grad(x, M.stack_tasks([_task()]), vmap=True)
