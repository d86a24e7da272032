"""GradientEngine: rules against hand-computed cases, per-sample/batch consistency, chunking,
errors, training graphs, AlexNet against finite differences, and real Caffe gradients."""
import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnvis.autodiff import GradientEngine, gradcheck, gradients, supported_ops, to_float64
from cnnvis.model import chunk_bounds
from cnnvis.errors import CnnvisError
from cnnvis.onnxgraph import create_session, make_model


def n(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)


def model_of(nodes, inits, in_shape, out):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v), k)
                           for k, v in inits.items()])
    return make_model(g)


def forward_tensor(model, x, name):
    g = helper.make_graph(list(model.graph.node), "f", list(model.graph.input),
                          [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)], list(model.graph.initializer))
    return create_session(make_model(g), device="cpu").run(None, {"x": x})[0]


# ------------------------------------------------------------ numpy references for the rules

def conv2d(x, w, pad):
    """Direct float64 cross-correlation, (C,H,W) x (M,C,k,k) -> (M,H',W')."""
    xp = np.pad(x, [(0, 0), (pad, pad), (pad, pad)])
    m, _, k, _ = w.shape
    oh, ow = xp.shape[1] - k + 1, xp.shape[2] - k + 1
    y = np.zeros((m, oh, ow))
    for o, i, j in itertools.product(range(m), range(oh), range(ow)):
        y[o, i, j] = np.sum(xp[:, i:i + k, j:j + k] * w[o])
    return y


def conv2d_input_grad(g, w, pad, in_shape):
    c, h, wd = in_shape
    k = w.shape[2]
    dxp = np.zeros((c, h + 2 * pad, wd + 2 * pad))
    for o, i, j in itertools.product(range(w.shape[0]), range(g.shape[1]), range(g.shape[2])):
        dxp[:, i:i + k, j:j + k] += g[o, i, j] * w[o]
    return dxp[:, pad:pad + h, pad:pad + wd]


def maxpool_switches(a, k, s):
    """First maximum (row-major) of each window: returns pooled values and (row, col) switches."""
    c, h, w = a.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    out = np.zeros((c, oh, ow))
    sw = np.zeros((c, oh, ow, 2), dtype=int)
    for ch, i, j in itertools.product(range(c), range(oh), range(ow)):
        win = a[ch, i * s:i * s + k, j * s:j * s + k]
        r, q = np.unravel_index(np.argmax(win), win.shape)  # argmax returns the first maximum
        out[ch, i, j] = win[r, q]
        sw[ch, i, j] = (i * s + r, j * s + q)
    return out, sw


def hand_backprop(x, w, seed, rule, k=2, s=2):
    """conv(3x3, pad 1) -> relu -> maxpool, backward of <pool, seed> by the rule's definition."""
    pre = conv2d(x, w, 1)
    act = np.maximum(pre, 0)
    _, sw = maxpool_switches(act, k, s)
    up = np.zeros_like(act)
    for ch, i, j in itertools.product(*[range(d) for d in seed.shape]):
        r, q = sw[ch, i, j]
        up[ch, r, q] += seed[ch, i, j]
    if rule == "gradient":
        back = up * (pre > 0)
    elif rule == "deconvnet":
        back = np.maximum(up, 0)
    else:
        back = np.maximum(up, 0) * (pre > 0)
    return conv2d_input_grad(back, w, 1, x.shape)


@pytest.fixture(scope="module")
def conv_relu_pool():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 3, 3))
    nodes = [n("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), n("Relu", ["c"], ["r"]),
             n("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2])]
    return model_of(nodes, {"w": w}, (2, 6, 6), "p"), w.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("rule", ["gradient", "deconvnet", "guided"])
def test_rules_match_hand_computed_conv_relu_pool(conv_relu_pool, rule):
    model, w = conv_relu_pool
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    seed = rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
    # many relu zeros make pooling windows of tied zeros: the first one must take the signal
    for backend, tol in (("onnxruntime", 1e-5), ("reference", 1e-12)):
        m = model if backend == "onnxruntime" else to_float64(model)
        dtype = np.float32 if backend == "onnxruntime" else np.float64
        engine = GradientEngine(m, "x", objective="seed", target="p", rule=rule, backend=backend)
        got = engine.run(x.astype(dtype), seed=seed.astype(dtype))["x"]
        for i in range(3):
            want = hand_backprop(x[i].astype(np.float64), w, seed[i].astype(np.float64), rule)
            np.testing.assert_allclose(got[i], want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))


def test_rules_differ_only_at_rectifiers():
    rng = np.random.default_rng(2)
    nodes = [n("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
             n("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], ceil_mode=1, strides=[2, 2]),
             n("LRN", ["p"], ["l"], size=3), n("Flatten", ["l"], ["f"]), n("Gemm", ["f", "fc"], ["y"], transB=1)]
    m = model_of(nodes, {"w": rng.standard_normal((4, 2, 3, 3)), "fc": rng.standard_normal((5, 16))}, (2, 9, 9), "y")
    x = rng.standard_normal((2, 2, 9, 9)).astype(np.float32)
    results = [GradientEngine(m, ["x", "w"], objective="logit", target="y", rule=r).run(x, index=3) for r in
               ("gradient", "deconvnet", "guided")]
    for other in results[1:]:
        for k in ("x", "w"):
            np.testing.assert_array_equal(other[k], results[0][k])


def test_maxpool_ties_route_to_first_maximum_of_each_window():
    # values tie inside windows and across overlapping windows (k=3, s=2, ceil overhang)
    x = np.array([[1, 5, 5, 2, 5], [5, 0, 5, 5, 1], [3, 5, 1, 5, 5], [5, 5, 2, 0, 4], [1, 1, 5, 5, 5]], np.float32)
    x = np.stack([x, x.T])[None]  # 1 x 2 x 5 x 5
    nodes = [n("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1)]
    m = model_of(nodes, {}, (2, 5, 5), "p")
    out = create_session(m, device="cpu").run(None, {"x": x})[0]
    seed = np.arange(1, out.size + 1, dtype=np.float32).reshape(out.shape)
    # expected: window by window, the first maximum in row-major order within the window
    want = np.zeros_like(x, dtype=np.float64)
    oh, ow = out.shape[2:]
    for ch, i, j in itertools.product(range(2), range(oh), range(ow)):
        best, where = -np.inf, None
        for a, c in itertools.product(range(3), range(3)):
            r, q = i * 2 - 1 + a, j * 2 + c
            if 0 <= r < 5 and 0 <= q < 5 and x[0, ch, r, q] > best:
                best, where = x[0, ch, r, q], (r, q)
        want[0, ch][where] += seed[0, ch, i, j]
    assert out.shape == (1, 2, 3, 3)
    for m_, dtype in ((m, np.float32), (to_float64(m), np.float64)):
        got = GradientEngine(m_, "x", objective="seed", target="p").run(x.astype(dtype), seed=seed.astype(dtype))["x"]
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------ per-sample, batch sums, chunking

@pytest.fixture(scope="module")
def small_cnn():
    rng = np.random.default_rng(3)
    nodes = [n("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], group=2),
             n("PRelu", ["c1", "slope"], ["r1"]), n("Add", ["r1", "bias_map"], ["a1"]),
             n("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             n("BatchNormalization", ["p1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
             n("Flatten", ["bn"], ["f"]), n("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
             n("Softmax", ["logits"], ["prob"], axis=1)]
    inits = {"w1": rng.standard_normal((4, 1, 3, 3)), "b1": rng.standard_normal(4), "slope": np.full((4, 1, 1), 0.1),
             "bias_map": rng.standard_normal((1, 4, 1, 1)), "bn_s": rng.uniform(0.5, 1.5, 4), "bn_b": rng.standard_normal(4),
             "bn_m": rng.standard_normal(4), "bn_v": rng.uniform(0.5, 2, 4), "fc_w": rng.standard_normal((6, 4 * 3 * 3)),
             "fc_b": rng.standard_normal(6)}
    return model_of(nodes, inits, (2, 9, 9), "prob")


WEIGHTS = ["w1", "b1", "slope", "bias_map", "bn_s", "bn_b", "fc_w", "fc_b"]


def test_per_sample_gradients_sum_to_the_batch_gradient(small_cnn):
    x = np.random.default_rng(4).standard_normal((5, 2, 9, 9)).astype(np.float32)
    idx = np.array([0, 1, 2, 3, 5])
    per = GradientEngine(small_cnn, WEIGHTS + ["x"], objective="logit").run(x, index=idx)
    total = GradientEngine(small_cnn, WEIGHTS + ["x"], objective="logit", per_sample=False).run(x, index=idx)
    for w in WEIGHTS:
        init = next(i for i in small_cnn.graph.initializer if i.name == w)
        assert per[w].shape == (5, *init.dims) and total[w].shape == tuple(init.dims)
        np.testing.assert_allclose(per[w].sum(0), total[w], rtol=0, atol=1e-5 * np.abs(total[w]).max())
        # each sample's gradient is the gradient of that sample alone
        single = GradientEngine(small_cnn, [w], objective="logit", per_sample=False).run(x[2:3], index=idx[2])
        np.testing.assert_allclose(per[w][2], single[w], rtol=0, atol=1e-5 * np.abs(single[w]).max())
    np.testing.assert_array_equal(per["x"], total["x"])


def test_results_do_not_depend_on_the_chunk_size(small_cnn):
    x = np.random.default_rng(5).standard_normal((7, 2, 9, 9)).astype(np.float32)
    ref = GradientEngine(small_cnn, ["x", "w1", "fc_w"], objective="probability", per_sample=False,
                         batch_size=7).run(x, index=np.arange(7) % 6)
    per_ref = GradientEngine(small_cnn, ["w1"], objective="probability").run(x, index=np.arange(7) % 6)
    for bs in (1, 3):
        got = GradientEngine(small_cnn, ["x", "w1", "fc_w"], objective="probability", per_sample=False,
                             batch_size=bs).run(x, index=np.arange(7) % 6)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-6 * np.abs(ref[k]).max())
        np.testing.assert_allclose(got.objective, ref.objective, rtol=1e-6)
        per = GradientEngine(small_cnn, ["w1"], objective="probability", batch_size=bs).run(x, index=np.arange(7) % 6)
        np.testing.assert_allclose(per["w1"], per_ref["w1"], rtol=0, atol=1e-6 * np.abs(per_ref["w1"]).max())


def test_parts_cut_chunks_into_near_equal_nonempty_pieces():
    # the engine's parts are the model's one chunking loop (cnnvis.model.chunk_bounds)
    assert chunk_bounds(7, 4, 1) == [(0, 4), (4, 7)]
    assert chunk_bounds(7, 4, 2) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert chunk_bounds(3, 8, 4) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("per_sample", [True, False])
def test_workers_run_parts_concurrently_with_the_same_results(small_cnn, per_sample):
    x = np.random.default_rng(9).standard_normal((7, 2, 9, 9)).astype(np.float32)
    idx = np.arange(7) % 6
    ref = GradientEngine(small_cnn, ["x", "w1", "fc_w"], objective="logit", per_sample=per_sample,
                         batch_size=4).run(x, index=idx)
    engine = GradientEngine(small_cnn, ["x", "w1", "fc_w"], objective="logit", per_sample=per_sample,
                            batch_size=4, workers=2, threads=2)
    got = engine.run(x, index=idx)
    assert len(engine._runners_for(engine.graph(x.shape[1:]))) == 2
    np.testing.assert_allclose(got.objective, ref.objective, rtol=1e-6)
    for k in ref:
        assert got[k].shape == ref[k].shape
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-6 * np.abs(ref[k]).max())
    # the same workers repeat exactly
    again = engine.run(x, index=idx)
    for k in ref:
        np.testing.assert_array_equal(again[k], got[k])


class _FreshSessions:
    """A sessions provider without a cache: a new onnxruntime session on every call, made as the
    engine made its own before it took them from a SessionCache."""

    def __init__(self):
        self.calls = 0

    def __call__(self, key, build, threads, device):
        self.calls += 1
        return create_session(build(), device=device, threads=threads)

    def drop(self, keep):
        pass


@pytest.mark.parametrize("workers", [1, 2])
def test_an_engine_without_a_model_keeps_its_sessions_in_a_session_cache(small_cnn, workers):
    from cnnvis.model import SessionCache

    x = np.random.default_rng(12).standard_normal((7, 2, 9, 9)).astype(np.float32)
    idx = np.arange(7) % 6
    options = dict(objective="logit", batch_size=4, workers=workers, threads=workers)
    engine = GradientEngine(small_cnn, ["w1", "x"], **options)
    got = engine.run(x, index=idx)
    assert type(engine.sessions) is SessionCache
    # one session per built graph and worker, each built once: a second run adds none
    keys = sorted(engine.sessions)
    assert keys and all(k[0] == "graph" for k in keys)
    assert len(keys) == workers * len({id(g) for g in engine._built.values()})
    sessions = [engine.sessions[k] for k in keys]
    again = engine.run(x, index=idx)
    assert sorted(engine.sessions) == keys and all(engine.sessions[k] is s for k, s in zip(keys, sessions))
    # bit-identical to sessions made fresh for every graph, outside any cache: the per-sample
    # weight gradient and the input gradient
    fresh = _FreshSessions()
    ref = GradientEngine(small_cnn, ["w1", "x"], sessions=fresh, **options).run(x, index=idx)
    assert fresh.calls == len(keys)
    assert got["w1"].shape == (7, 4, 1, 3, 3) and got["x"].shape == x.shape
    for k in ("w1", "x"):
        np.testing.assert_array_equal(got[k], ref[k])
        np.testing.assert_array_equal(again[k], ref[k])
    np.testing.assert_array_equal(got.objective, ref.objective)


def test_a_float64_engine_runs_the_reference_evaluator_without_sessions(small_cnn):
    engine = GradientEngine(to_float64(small_cnn), ["x"], objective="logit")
    engine.run(np.ones((2, 2, 9, 9)), index=1)
    assert engine.backend_ == "reference" and len(engine.sessions) == 0


def test_workers_need_onnxruntime_on_cpu_and_a_positive_count(small_cnn, monkeypatch):
    with pytest.raises(CnnvisError, match="workers 0: expected a positive integer"):
        GradientEngine(small_cnn, "x", workers=0)
    assert GradientEngine(small_cnn, "x", workers=2, device="cpu").workers_ == 2
    assert GradientEngine(small_cnn, "x", workers=2, threads=1, device="cpu").workers_ == 1  # one core asked for
    assert GradientEngine(to_float64(small_cnn), "x", workers=2).workers_ == 1  # reference evaluator
    import cnnvis.autodiff.engine as engine_module

    monkeypatch.setattr(engine_module, "select_providers", lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert GradientEngine(small_cnn, "x", workers=2).workers_ == 1  # a GPU takes the whole chunk


def test_a_graph_without_a_fixed_batch_form_serves_full_and_short_chunks(small_cnn):
    engine = GradientEngine(small_cnn, ["x", "w1"], objective="logit", batch_size=4)
    engine.run(np.zeros((7, 2, 9, 9), np.float32), index=0)
    engine.run(np.zeros((2, 2, 9, 9), np.float32), index=0)
    assert len({id(g) for g in engine._built.values()}) == 1 and len(engine._runners) == 1


def test_one_graph_serves_every_class_and_is_built_once(small_cnn):
    engine = GradientEngine(small_cnn, "x", objective="logit")
    x = np.random.default_rng(6).standard_normal((2, 2, 9, 9)).astype(np.float32)
    a = engine.run(x, index=0)
    b = engine.run(x, index=np.array([4, 0]))
    assert len(engine._built) == 1
    np.testing.assert_array_equal(a["x"][1], b["x"][1])
    assert not np.allclose(a["x"][0], b["x"][0])
    logits = forward_tensor(small_cnn, x, "logits")
    np.testing.assert_allclose(b.objective, [logits[0, 4], logits[1, 0]], rtol=1e-6)


def test_unit_index_forms_and_gradients_helper(small_cnn):
    x = np.random.default_rng(7).standard_normal((2, 2, 9, 9)).astype(np.float32)
    by_tuple = gradients(small_cnn, x, "x", objective="unit", target="c1", index=(1, 2, 3))
    by_rows = gradients(small_cnn, x, "x", objective="unit", target="c1", index=np.array([[1, 2, 3], [1, 2, 3]]))
    flat = gradients(small_cnn, x, "x", objective="unit", target="c1", index=1 * 25 + 2 * 5 + 3)
    np.testing.assert_array_equal(by_tuple["x"], by_rows["x"])
    np.testing.assert_array_equal(by_tuple["x"], flat["x"])
    c1 = forward_tensor(small_cnn, x, "c1")
    np.testing.assert_allclose(by_tuple.objective, c1[:, 1, 2, 3], rtol=1e-6)


# ------------------------------------------------------------ errors

def test_unsupported_op_on_the_path_is_one_line_error_naming_node_and_op():
    nodes = [n("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), n("Floor", ["c"], ["fl"]), n("Relu", ["c"], ["r"]),
             n("Add", ["r", "fl"], ["y"])]
    m = model_of(nodes, {"w": np.ones((2, 2, 1, 1))}, (2, 3, 3), "y")
    with pytest.raises(CnnvisError) as err:
        GradientEngine(m, "x", objective="channel_sum", target="y").run(np.ones((1, 2, 3, 3), np.float32), index=0)
    msg = str(err.value)
    assert "'fl'" in msg and "Floor" in msg and "\n" not in msg
    # and it says what still runs without gradients
    assert "need no gradients: activations, volume, order, render, occlusion, invariance, filters, layers" in msg
    # off the path it does not matter: the gradient of r (target) w.r.t. x never meets Floor
    r = GradientEngine(m, "x", objective="channel_sum", target="r").run(np.ones((1, 2, 3, 3), np.float32), index=1)
    np.testing.assert_allclose(r["x"][0, :, 0, 0], [1.0, 1.0])
    assert "Floor" not in supported_ops() and "Conv" in supported_ops()


def test_user_errors(small_cnn):
    x = np.zeros((2, 2, 9, 9), np.float32)
    with pytest.raises(CnnvisError, match="unknown wrt tensor 'conv9'"):
        GradientEngine(small_cnn, "conv9").run(x, index=0)
    with pytest.raises(CnnvisError, match=r"values must be in \[0, 6\)"):
        GradientEngine(small_cnn, "x").run(x, index=6)
    with pytest.raises(CnnvisError, match="needs index="):
        GradientEngine(small_cnn, "x").run(x)
    with pytest.raises(CnnvisError, match="does not depend on it"):
        GradientEngine(small_cnn, "fc_w", objective="unit", target="c1").run(x, index=0)
    with pytest.raises(CnnvisError, match="rule 'backprop'"):
        GradientEngine(small_cnn, "x", rule="backprop").run(x, index=0)
    with pytest.raises(CnnvisError, match="objective 'saliency'"):
        GradientEngine(small_cnn, "x", objective="saliency")
    with pytest.raises(CnnvisError, match="seed: expected shape"):
        GradientEngine(small_cnn, "x", objective="seed", target="p1").run(x, seed=np.zeros((2, 3)))


# ------------------------------------------------------------ training graphs

@pytest.mark.parametrize("workers", [1, 2])
def test_training_cross_entropy_with_dropout_masks_matches_numpy(workers):
    rng = np.random.default_rng(8)
    w1, b1, w2, b2 = rng.standard_normal((6, 4)), rng.standard_normal(6), rng.standard_normal((3, 6)), rng.standard_normal(3)
    ratio = np.array(0.25, np.float32)
    nodes = [n("Flatten", ["x"], ["f"]), n("Gemm", ["f", "w1", "b1"], ["h"], transB=1), n("Relu", ["h"], ["r"]),
             n("Dropout", ["r", "ratio"], ["d"]), n("Gemm", ["d", "w2", "b2"], ["z"], transB=1),
             n("Softmax", ["z"], ["prob"], axis=1)]
    m = model_of(nodes, {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "ratio": ratio}, (4,), "prob")
    engine = GradientEngine(m, ["w1", "b1", "w2", "b2"], objective="cross_entropy", training=True, per_sample=False,
                            workers=workers)  # 2: parts of 2 and 3 images, masks and labels cut with them
    x = rng.standard_normal((5, 4)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0])
    masks = engine.dropout_masks(5, (4,), np.random.default_rng(0))
    (mask_name, mask), = masks.items()
    assert mask.shape == (5, 6) and set(np.unique(mask)) <= {0.0, 1.0}
    new_w2 = rng.standard_normal((3, 6)).astype(np.float32)
    # every weight may be fed, also those the training graph no longer reads (the dropout ratio)
    got = engine.run(x, labels=labels, masks=masks, params={"w2": new_w2, "ratio": ratio})
    # numpy float64 reference with the overridden weight
    w1_, b1_, w2_, b2_ = (a.astype(np.float32).astype(np.float64) for a in (w1, b1, new_w2, b2))
    h = x @ w1_.T + b1_
    r = np.maximum(h, 0)
    d = r * mask / (1 - 0.25)
    z = d @ w2_.T + b2_
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[labels]
    dz = (p - onehot) / 5
    dd = dz @ w2_
    dh = dd * mask / 0.75 * (h > 0)
    want = {"w2": dz.T @ d, "b2": dz.sum(0), "w1": dh.T @ x, "b1": dh.sum(0)}
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-5 * np.abs(v).max())
    np.testing.assert_allclose(got.objective, -np.log(p[np.arange(5), labels]), rtol=1e-5)
    with pytest.raises(CnnvisError, match="pass masks="):
        engine.run(x, labels=labels)


# ------------------------------------------------------------ AlexNet and real Caffe

def test_alexnet_class_logit_conv1_weight_gradient_against_finite_differences():
    nets = pytest.importorskip("cnnvis.nets")
    model = nets.build_alexnet(seed=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 227, 227)).astype(np.float32) * 50
    # batch_size 1: the image is a full chunk, run in the graph specialised to one image
    engine = GradientEngine(model, ["conv1.weight", "conv1.bias"], objective="logit", batch_size=1)
    assert engine.graph((3, 227, 227)).target == "fc8"
    res = engine.run(x, index=281)
    assert engine.graph((3, 227, 227), batch=1).static_batch == 1
    assert res["conv1.weight"].shape == (1, 96, 3, 11, 11) and res["conv1.bias"].shape == (1, 96)
    reports = gradcheck(model, x, "conv1.weight", index=281, samples=20,
                        analytic={"conv1.weight": res["conv1.weight"][0]})
    r = reports["conv1.weight"]
    assert np.count_nonzero(r.numeric) >= 10
    assert r.max_rel_error <= 1e-3, str(r)


def test_caffe_cifar10_quick_gradients_match_real_caffe(shared_dir):
    caffe = pytest.importorskip("cnnvis.caffe")
    ref_dir = shared_dir / "reference" / "caffe_cifar10_quick"
    model = caffe.load_caffe(shared_dir / "caffe/cifar10_quick/cifar10_quick.prototxt",
                             shared_dir / "caffe/cifar10_quick/cifar10_quick_iter_4000.caffemodel")
    x = np.load(ref_dir / "cifar_input.npz")["input"]
    ref = np.load(ref_dir / "cifar10_quick_iter4000_backward.npz")
    meta = caffe.caffe_metadata(model)
    params = meta[caffe.META_PARAMS]
    blobs = meta[caffe.META_BLOBS]
    conv1_w, conv1_b = params["conv1"][:2]
    image = model.graph.input[0].name
    per = GradientEngine(model, [image, conv1_w, conv1_b], objective="unit", target=blobs["ip2"][-1]).run(x, index=3)

    def close(got, want):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())

    for i in range(4):
        close(per[conv1_w][i], ref[f"conv1_W_diff_img{i}"])
        close(per[conv1_b][i], ref[f"conv1_b_diff_img{i}"])
    close(per[image], ref["data_diff"])
    names = [p for layer in ("conv1", "conv2", "conv3", "ip1", "ip2") for p in params[layer][:2]]
    total = GradientEngine(model, names, objective="unit", target=blobs["ip2"][-1], per_sample=False).run(x, index=3)
    for layer in ("conv1", "conv2", "conv3", "ip1", "ip2"):
        w, b = params[layer][:2]
        close(total[w], ref[f"param_{layer}__W_diff_batchsum"])
        close(total[b], ref[f"param_{layer}__b_diff_batchsum"])


# ------------------------------------------------------------ the rule table and the README

def test_readme_op_list_is_the_generated_rule_table():
    from pathlib import Path

    from cnnvis.autodiff.rules import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- backward-rules: generated")
    start = readme.index("\n", start) + 1
    end = readme.index("<!-- backward-rules: end -->")
    assert readme[start:end] == markdown_table()
    rows = [line.split("|")[1].strip() for line in markdown_table().splitlines()[2:]]
    assert rows == supported_ops()
    for op in ("HardSwish", "ReduceMean", "LayerNormalization", "Resize", "Einsum", "ConvTranspose"):
        assert op in rows


def _chunk_net(w):
    """x (1, 4, 3, 3) split as TorchScript writes torch.chunk(x, 2, dim=1): Slice bounds from
    Shape -> Gather(1) -> Add(1) -> Div(2) (-> Mul(2)) -> Unsqueeze. logits (N, 2) =
    tanh(mean of the first half over H, W) * conv(second half, w) (a 3x3 kernel, no padding)."""
    i64 = lambda v: numpy_helper.from_array(np.array(v, np.int64), f"k{v}")  # noqa: E731
    consts = [i64(1), i64(2), i64([0]), i64([1])]
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "k1"], ["c"], axis=0),
        helper.make_node("Add", ["c", "k1"], ["c1"]),
        helper.make_node("Div", ["c1", "k2"], ["half"]),
        helper.make_node("Mul", ["half", "k2"], ["whole"]),
        helper.make_node("Unsqueeze", ["half", "k[0]"], ["mid"]),
        helper.make_node("Unsqueeze", ["whole", "k[0]"], ["end"]),
        helper.make_node("Slice", ["x", "k[0]", "mid", "k[1]"], ["a"]),
        helper.make_node("Slice", ["x", "mid", "end", "k[1]"], ["b"]),
        helper.make_node("ReduceMean", ["a"], ["am"], axes=[2, 3], keepdims=1),
        helper.make_node("Tanh", ["am"], ["t"]),
        helper.make_node("Conv", ["b", "w"], ["cb"]),
        helper.make_node("Mul", ["t", "cb"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"], axis=1),
    ]
    inits = consts + [numpy_helper.from_array(w.astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "chunk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    return make_model(graph)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_gradients_through_slices_with_computed_bounds_equal_central_differences(precision):
    """float32 in onnxruntime (rtol 1e-4); float64 with the reference backend (rtol 1e-7): that
    graph's Conv has no float64 kernel in onnxruntime, its computed Slice bounds are folded from a
    float32 probe (onnxgraph.fold_shape_arithmetic), as for an export without folding."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((2, 2, 3, 3))
    x = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)

    def logits(xs):  # independent float64 numpy forward: halves [0, 2) and [2, 4) of the 4 channels
        a, b = xs[:, :2], xs[:, 2:]
        return np.tanh(a.mean(axis=(2, 3))) * np.einsum("nchw,ochw->no", b, w)

    if precision == "float64":
        engine = GradientEngine(to_float64(_chunk_net(w)), ["x", "w"], objective="logit", target="y",
                                backend="reference")
        got, tol = engine.run(x.astype(np.float64), index=1), dict(rtol=1e-7, atol=1e-9)
    else:
        engine = GradientEngine(_chunk_net(w), ["x", "w"], objective="logit", target="y")
        got, tol = engine.run(x, index=1), dict(rtol=1e-4, atol=1e-5)
    eps = 1e-6
    for i in range(len(x)):
        x64 = x[i:i + 1].astype(np.float64)
        want = np.zeros_like(x64)
        for idx in np.ndindex(x64.shape):
            d = np.zeros_like(x64)
            d[idx] = eps
            want[idx] = (logits(x64 + d)[0, 1] - logits(x64 - d)[0, 1]) / (2 * eps)
        np.testing.assert_allclose(got["x"][i], want[0], **tol)
        # dlogit1/dw[1] = tanh(mean a[1]) * b (per sample); w[0] gets nothing
        want_w = np.zeros_like(w)
        want_w[1] = np.tanh(x64[0, 1].mean()) * x64[0, 2:]
        np.testing.assert_allclose(got["w"][i], want_w, **tol)
