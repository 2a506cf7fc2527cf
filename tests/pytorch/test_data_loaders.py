"""DataLoaders and other iterables as lower_data / upper_data (bilevel.sampling.as_sampler)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import bilevel as bl
from bilevel.sampling import IterableSampler, as_sampler, paired

F64 = torch.float64


def _data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)


def _ids(batch):
    return batch[1].tolist()


def test_reiterated_per_epoch_and_counts_epochs():
    batches = [(torch.tensor([float(i)]),) for i in range(3)]
    s = as_sampler(batches, "lower_data")
    got = [float(s.next()[0]) for _ in range(7)]
    assert got == [0, 1, 2, 0, 1, 2, 0]
    assert s.epoch == 2 and s.pos == 1


def test_full_concatenates_one_pass_without_disturbing_the_order():
    X, t = _data()
    idx = torch.arange(10)
    mk = lambda: DataLoader(TensorDataset(X, idx), batch_size=4, shuffle=True,  # noqa: E731
                            generator=torch.Generator().manual_seed(3))
    a, b = IterableSampler(mk()), IterableSampler(mk())
    first = _ids(a.next())
    full = b.full()
    assert torch.equal(torch.sort(full[1]).values, idx) and torch.equal(torch.sort(full[0], 0)[0],
                                                                         torch.sort(X, 0)[0])
    assert _ids(b.next()) == first  # full() restored the generator


@pytest.mark.parametrize("cut", [2, 3, 7])  # inside the first epoch, at its end, in a later one
def test_resume_is_exact_with_a_seeded_loader(cut):
    X, _ = _data()
    idx = torch.arange(10)

    def loader():
        return DataLoader(TensorDataset(X, idx), batch_size=3, shuffle=True,
                          generator=torch.Generator().manual_seed(7))

    ref = IterableSampler(loader())
    straight = [_ids(ref.next()) for _ in range(12)]
    first = IterableSampler(loader())
    head = [_ids(first.next()) for _ in range(cut)]
    saved = first.state_dict()
    resumed = IterableSampler(loader())  # fresh loader, fresh generator: only the state carries over
    resumed.load_state_dict(saved)
    tail = [_ids(resumed.next()) for _ in range(12 - cut)]
    assert head + tail == straight
    assert len({tuple(b) for b in straight[:4]}) == 4 and straight[:4] != straight[4:8]  # shuffles


def test_dataloader_drives_solve_like_the_equivalent_full_batch():
    X, t = _data(12)
    prob = bl.Problem(
        upper=lambda x, y, b: ((b[0] @ y - b[1]) ** 2).mean(),
        lower=lambda x, y, b: ((b[0] @ y - b[1]) ** 2).mean() + x.exp() * (y ** 2).sum(),
    )
    solver = bl.solvers.HypergradientDescent(
        bl.hypergrad.CG(bl.inner.GD(lr=0.2, steps=30), iters=10), upper=0.5)
    x0, y0 = torch.tensor(0.0, dtype=F64), torch.zeros(3, dtype=F64)
    ref = bl.solve(prob, x0, y0, solver=solver, steps=4, lower_data=bl.sampling.FullBatch(X, t),
                   upper_data=bl.sampling.FullBatch(X, t))
    loader = DataLoader(TensorDataset(X, t), batch_size=12)
    res = bl.solve(prob, x0, y0, solver=solver, steps=4, lower_data=loader, upper_data=loader)
    torch.testing.assert_close(res.x, ref.x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.y, ref.y, rtol=1e-12, atol=1e-12)
    assert res.history[-1]["upper_loss"] == pytest.approx(ref.history[-1]["upper_loss"], rel=1e-12)


def test_batches_move_to_the_device_of_the_variables():
    s = as_sampler([(torch.ones(2),)], "lower_data", device="meta")
    assert s.next()[0].device.type == "meta" and s.full()[0].device.type == "meta"


def test_dataloader_with_a_worker_process():
    X, t = _data(8)
    s = as_sampler(DataLoader(TensorDataset(X, t), batch_size=4, num_workers=1), "lower_data")
    got = [s.next() for _ in range(3)]
    torch.testing.assert_close(got[2][0], X[:4])


def test_empty_loader_is_an_error_naming_the_argument():
    empty = DataLoader(TensorDataset(torch.zeros(0, 3)), batch_size=2)
    prob = bl.Problem(upper=lambda x, y, b: (y ** 2).sum(), lower=lambda x, y, b: (y - x).pow(2).sum())
    est = bl.hypergrad.CG(bl.inner.GD(lr=0.1, steps=2))
    with pytest.raises(ValueError, match="upper_data: the data loader / iterable yielded no batch"):
        bl.solve(prob, torch.zeros(2), torch.zeros(2), solver=bl.solvers.HypergradientDescent(est),
                 steps=1, lower_data=[(torch.zeros(1),)], upper_data=empty)


def test_single_pass_iterators_and_non_iterables_are_rejected_by_name():
    with pytest.raises(TypeError, match="lower_data: got a single-pass iterator"):
        as_sampler(iter([(torch.ones(1),)]), "lower_data")
    with pytest.raises(TypeError, match="upper_data must be a bilevel.sampling sampler"):
        as_sampler(torch.ones(3), "upper_data")
    with pytest.raises(TypeError, match="upper_data must be"):
        as_sampler(3, "upper_data")


def test_paired_batches_come_from_the_same_task_whatever_the_call_order():
    tasks = [((torch.tensor([float(i)]),), (torch.tensor([10.0 + i]),)) for i in range(3)]
    lo, up = paired(tasks)
    assert float(up.next()[0]) == 10 and float(lo.next()[0]) == 0  # upper asked first
    assert float(lo.next()[0]) == 1 and float(up.next()[0]) == 11
    saved = lo.state_dict()
    assert float(lo.next()[0]) == 2
    with pytest.raises(RuntimeError, match="lower batch drawn twice"):
        lo.next()
    lo2, up2 = paired(tasks)
    lo2.load_state_dict(saved)
    assert float(up2.next()[0]) == 12 and float(lo2.next()[0]) == 2
    torch.testing.assert_close(lo.full()[0], torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(up.full()[0], torch.tensor([10.0, 11.0, 12.0]))
    with pytest.raises(TypeError, match="pairs"):
        paired([(torch.ones(1),)])[0].next()


def _resume_problem():
    X, t = _data(14, seed=5)
    prob = bl.Problem(
        upper=lambda x, y, b: ((b[0] @ y - b[1]) ** 2).mean(),
        lower=lambda x, y, b: ((b[0] @ y - b[1]) ** 2).mean() + x.exp() * (y ** 2).sum(),
    )
    return X, t, prob


def _shuffled(X, t, seed, batch_size):
    return DataLoader(TensorDataset(X, t), batch_size=batch_size, shuffle=True,
                      generator=None if seed is None else torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("solver", ["hgd", "soba"])
def test_solve_resume_with_fresh_seeded_dataloaders_is_bitwise_exact(solver, tmp_path):
    """Stop after 5 of 12 outer steps (inside the 2nd epoch of the lower loader: 3 batches per
    epoch), save the state with torch.save, resume in a new solve call with freshly built loaders
    (new generators with the same seeds): x, y and the history equal the uninterrupted run's
    bit for bit (float64)."""
    import warnings

    X, t, prob = _resume_problem()
    make = {"hgd": lambda: bl.solvers.HypergradientDescent(
                bl.hypergrad.CG(bl.inner.GD(lr=0.2, steps=5), iters=5), upper=0.3),
            "soba": lambda: bl.solvers.SOBA(lr_x=0.05, lr_y=0.1)}[solver]
    x0, y0 = torch.tensor(0.0, dtype=F64), torch.zeros(3, dtype=F64)

    def run(steps, state=None, callback=None):
        return bl.solve(prob, x0, y0, solver=make(), steps=steps, state=state, callback=callback,
                        lower_data=_shuffled(X, t, 1, 5), upper_data=_shuffled(X, t, 2, 4), track=2)

    ref = run(12)
    part = run(12, callback=lambda k, x, y, rec: k == 5)
    assert part.state["t"] == 5 and part.state["data"]["lower"]["epoch"] == 1
    torch.save(part.state, tmp_path / "ck.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.errors.InexactResumeWarning)  # seeded: no warning
        res = run(12, state=torch.load(tmp_path / "ck.pt", weights_only=False))
    assert torch.equal(res.x, ref.x) and torch.equal(res.y, ref.y)
    # ("compiled": under --solve-compile the first step of a pattern is eager in one run only)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("time", "compiled")} for r in h]  # noqa: E731
    assert strip(part.history + res.history) == strip(ref.history)
    # the batches really differ between epochs (a shuffling loader), so the position mattered
    other = bl.solve(prob, x0, y0, solver=make(), steps=7, state=None,
                     lower_data=_shuffled(X, t, 1, 5), upper_data=_shuffled(X, t, 2, 4))
    assert not torch.equal(other.x, ref.x)


def test_resume_with_a_loader_on_the_global_rng_warns_once_and_keeps_the_position():
    X, t, prob = _resume_problem()
    solver = bl.solvers.SOBA(lr_x=0.05, lr_y=0.1)
    x0, y0 = torch.tensor(0.0, dtype=F64), torch.zeros(3, dtype=F64)
    part = bl.solve(prob, x0, y0, solver=solver, steps=4, track=False,
                    lower_data=_shuffled(X, t, None, 5), upper_data=_shuffled(X, t, None, 4))
    assert not as_sampler(_shuffled(X, t, None, 5)).exact_resume
    assert as_sampler(_shuffled(X, t, 0, 5)).exact_resume and as_sampler([(X,)]).exact_resume
    with pytest.warns(bl.errors.InexactResumeWarning, match="lower_data and upper_data") as rec:
        res = bl.solve(prob, x0, y0, solver=solver, steps=6, state=part.state, track=False,
                       lower_data=_shuffled(X, t, None, 5), upper_data=_shuffled(X, t, None, 4))
    assert len([w for w in rec if issubclass(w.category, bl.errors.InexactResumeWarning)]) == 1
    assert res.state["t"] == 6 and res.state["data"]["lower"]["pos"] == 3  # 6 batches of 3 per epoch
    with pytest.raises(bl.ConfigError, match="position of upper_data, but no upper_data"):
        bl.solve(prob, x0, y0, solver=solver, steps=6, state=part.state, track=False,
                 lower_data=_shuffled(X, t, None, 5))
