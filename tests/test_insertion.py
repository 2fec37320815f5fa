"""models.with_attention: attention inserted into a user's network, checked against the same network written by
hand with the attention called explicitly, in compact and setup style, trained, saved and restored."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import serialization

from attn_flax import attention, models
from attn_flax.models import insertion

X = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))


class Block(nn.Module):
    """A user's block: conv -> BN -> ReLU."""

    features: int

    @nn.compact
    def __call__(self, x, train):
        y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(y))


class CNN(nn.Module):
    """A user's compact network: two blocks, a pooled classifier."""

    @nn.compact
    def __call__(self, x, *, train):
        x = Block(8)(x, train)
        x = Block(8)(x, train)
        return nn.Dense(3)(x.mean((1, 2)))


class HandCNN(nn.Module):
    """CNN written by hand with CBAM after each block, as with_attention(CNN(), 'cbam', after='Block_*') should be."""

    @nn.compact
    def __call__(self, x, *, train):
        x = Block(8, name="Block_0")(x, train)
        x = attention.CBAM(reduction=2, name="cbam_0")(x, train=train)
        x = Block(8, name="Block_1")(x, train)
        x = attention.CBAM(reduction=2, name="cbam_1")(x, train=train)
        return nn.Dense(3, name="Dense_0")(x.mean((1, 2)))


class SetupCNN(nn.Module):
    """The same network defined in setup(), its blocks under names of its own."""

    def setup(self):
        self.first = Block(8)
        self.second = Block(8)
        self.head = nn.Dense(3)

    def __call__(self, x, train=False):
        return self.head(self.second(self.first(x, train), train).mean((1, 2)))


class Scale(nn.Module):
    """An attention of the test's own: x * s with a learned scalar s (1 at init, so the identity)."""

    @nn.compact
    def __call__(self, x, *, train):
        return x * self.param("s", nn.initializers.ones, ())


def perturbed(tree, seed=0):
    """Every leaf plus noise, so that no gate sits at its initial value (CBAM's spatial BN scale starts at 0)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def to_hand(variables):
    """The wrapped network's variables under HandCNN's names."""
    def move(tree):
        tree = dict(tree)
        inserted = tree.pop("attention")
        return {**tree, "cbam_0": inserted["Block_0"], "cbam_1": inserted["Block_1"]}
    return {name: move(tree) for name, tree in variables.items()}


@pytest.fixture(scope="module")
def wrapped():
    model = models.with_attention(CNN(), "cbam", after="Block_*", reduction=2)
    variables = model.init(jax.random.key(0), X, train=False)
    return model, {**variables, "params": perturbed(variables["params"])}


def test_the_attention_sits_under_the_matched_paths_and_the_network_keeps_its_names(wrapped):
    model, variables = wrapped
    bare = CNN().init(jax.random.key(0), X, train=False)
    assert sorted(variables["params"]["attention"]) == ["Block_0", "Block_1"]
    assert sorted(variables["batch_stats"]["attention"]) == ["Block_0", "Block_1"]  # CBAM's spatial BN
    cbam = attention.CBAM(reduction=2).init(jax.random.key(0), X[..., :1].repeat(8, -1), train=False)
    assert jax.tree.map(jnp.shape, variables["params"]["attention"]["Block_0"]) == jax.tree.map(
        jnp.shape, cbam["params"])
    rest = {k: v for k, v in model.init(jax.random.key(0), X, train=False)["params"].items() if k != "attention"}
    assert jax.tree.all(jax.tree.map(np.array_equal, rest, bare["params"]))  # a bare checkpoint loads as it is


@pytest.mark.parametrize("train", [False, True])
def test_the_wrapped_network_equals_the_network_written_by_hand(wrapped, train):
    model, variables = wrapped
    got, got_state = model.apply(variables, X, train=train, mutable=["batch_stats"])
    want, want_state = HandCNN().apply(to_hand(variables), X, train=train, mutable=["batch_stats"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
                 to_hand(got_state)["batch_stats"], want_state["batch_stats"])
    bare = CNN().apply({k: {n: t for n, t in v.items() if n != "attention"} for k, v in variables.items()},
                       X, train=train, mutable=["batch_stats"])[0]
    assert not np.allclose(got, bare, atol=1e-3)


def test_an_identity_attention_gives_the_bare_network():
    model = models.with_attention(CNN(), Scale, after="Block_*")
    variables = model.init(jax.random.key(0), X, train=False)
    assert variables["params"]["attention"] == {"Block_0": {"s": 1.0}, "Block_1": {"s": 1.0}}
    bare = {k: {n: t for n, t in v.items() if n != "attention"} for k, v in variables.items()}
    np.testing.assert_array_equal(model.apply(variables, X, train=False), CNN().apply(bare, X, train=False))


def test_insertion_by_module_type_matches_every_instance():
    by_norm = models.with_attention(CNN(), "cbam", after=nn.BatchNorm, reduction=2)
    assert sorted(by_norm.init(jax.random.key(0), X, train=False)["params"]["attention"]) == ["Block_0/bn",
                                                                                                "Block_1/bn"]
    by_block = models.with_attention(CNN(), "cbam", after=Block, reduction=2)
    by_path = models.with_attention(CNN(), "cbam", after="Block_*", reduction=2)
    variables = by_block.init(jax.random.key(0), X, train=False)
    assert jax.tree.all(jax.tree.map(np.array_equal, variables, by_path.init(jax.random.key(0), X, train=False)))
    variables = {**variables, "params": perturbed(variables["params"])}
    np.testing.assert_array_equal(by_block.apply(variables, X, train=False),
                                  by_path.apply(variables, X, train=False))


def test_rules_by_pattern_and_predicate():
    calls = insertion.matches
    assert calls(("*/bn",), "Block_1/bn", None) and not calls(("*/bn",), "Block_1", None)
    assert calls(("Block_*",), "Block_1", None) and not calls(("Block_*",), "Block_1/bn", None)
    assert calls(("**/bn",), "a/b/bn", None) and calls(("**/bn",), "bn", None)
    assert calls((lambda path, module: path.endswith("_1"),), "Block_1", None)
    model = models.with_attention(CNN(), "se", after=[lambda path, m: path == "Block_1", "Block_0/bn"], reduction=2)
    assert sorted(model.init(jax.random.key(0), X, train=False)["params"]["attention"]) == ["Block_0/bn", "Block_1"]


def test_a_setup_style_network_takes_attention_and_keeps_its_names():
    model = models.with_attention(SetupCNN(), Scale, after="*/bn")
    variables = model.init(jax.random.key(0), X)
    bare = SetupCNN().init(jax.random.key(0), X)
    assert sorted(variables["params"]) == ["attention", "first", "head", "second"]
    assert sorted(variables["params"]["attention"]) == ["first/bn", "second/bn"]
    params = {**variables["params"], "attention": {"first/bn": {"s": 1.0}, "second/bn": {"s": 1.0}}}
    np.testing.assert_array_equal(model.apply({**bare, "params": {**bare["params"], **params}}, X),
                                  SetupCNN().apply(bare, X))
    cbam = models.with_attention(SetupCNN(), "cbam", after=Block, reduction=2)
    variables = cbam.init(jax.random.key(0), X)
    variables = {**variables, "params": perturbed(variables["params"])}
    moved = {name: {**{k: v for k, v in tree.items() if k != "attention"},
                    "cbam_0": tree["attention"]["first"], "cbam_1": tree["attention"]["second"]}
             for name, tree in variables.items()}
    moved = {name: {{"first": "Block_0", "second": "Block_1", "head": "Dense_0"}.get(k, k): v
                    for k, v in tree.items()} for name, tree in moved.items()}
    np.testing.assert_allclose(cbam.apply(variables, X, train=False), HandCNN().apply(moved, X, train=False),
                               rtol=1e-6, atol=1e-6)


class Twice(nn.Module):
    """One 1x1 conv without bias applied twice (a shared layer)."""

    def setup(self):
        self.mix = nn.Conv(3, (1, 1), use_bias=False)

    def __call__(self, x):
        return self.mix(self.mix(x))


def test_a_module_called_twice_applies_one_attention_after_each_call():
    model = models.with_attention(Twice(), Scale, after="mix")
    variables = model.init(jax.random.key(0), X)
    assert list(variables["params"]["attention"]) == ["mix"]
    variables["params"]["attention"]["mix"]["s"] = jnp.asarray(2.0)
    bare = {"params": {"mix": variables["params"]["mix"]}}
    np.testing.assert_allclose(model.apply(variables, X), 4 * Twice().apply(bare, X), rtol=1e-6)


def loss_fn(model, params, batch_stats, x, labels):
    logits, state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state["batch_stats"]


def test_a_training_step_updates_the_attention_parameters_and_statistics():
    model = models.with_attention(CNN(), "bam", after="Block_*", reduction=2)
    variables = model.init(jax.random.key(0), X, train=False)
    tx = optax.sgd(0.1)
    labels = jnp.array([0, 2])

    @jax.jit
    def step(params, batch_stats, opt_state):
        (loss, batch_stats), grads = jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True)(
            params, batch_stats, X, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats, _, loss = step(variables["params"], variables["batch_stats"],
                                        tx.init(variables["params"]))
    assert np.isfinite(loss)
    for name in ("Block_0", "Block_1"):
        changed = jax.tree.map(lambda a, b: not np.allclose(a, b), params["attention"][name],
                               variables["params"]["attention"][name])
        # a bias in front of a BatchNorm gets no gradient (BN removes it); every other parameter moves
        still = [jax.tree_util.keystr(path) for path, moved in jax.tree_util.tree_flatten_with_path(changed)[0]
                 if not moved]
        assert all(p.endswith("['bias']") and "final" not in p for p in still), still
        stats = jax.tree.map(lambda a, b: not np.allclose(a, b), batch_stats["attention"][name],
                             variables["batch_stats"]["attention"][name])
        assert stats and all(jax.tree.leaves(stats)), stats


class NoTrain(nn.Module):
    """A user's network whose __call__ takes no train argument."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3))(x)


def test_train_mode_comes_from_the_users_argument_or_the_wrappers_keyword():
    model = models.with_attention(NoTrain(), "bam", after="Conv_0", reduction=2)
    variables = model.init(jax.random.key(0), X)  # train defaults to False, nothing passed to NoTrain
    _, state = model.apply(variables, X, train=True, mutable=["batch_stats"])
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, state["batch_stats"], variables["batch_stats"])))
    _, state = model.apply(variables, X, mutable=["batch_stats"])
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, state["batch_stats"], variables["batch_stats"])))
    setup_style = models.with_attention(SetupCNN(), "bam", after="first", reduction=2)
    variables = setup_style.init(jax.random.key(0), X)
    _, state = setup_style.apply(variables, X, True, mutable=["batch_stats"])  # SetupCNN's train, by position
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, state["batch_stats"]["attention"],
                                                variables["batch_stats"]["attention"])))


def test_jit_save_and_restore_give_the_same_outputs(wrapped, tmp_path):
    model, variables = wrapped
    apply = functools.partial(model.apply, train=False)
    want = apply(variables, X)
    np.testing.assert_allclose(jax.jit(apply)(variables, X), want, rtol=1e-6, atol=1e-6)

    blank = model.init(jax.random.key(5), X, train=False)
    restored = serialization.from_bytes(blank, serialization.to_bytes(variables))
    np.testing.assert_array_equal(apply(restored, X), want)

    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "variables", variables)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "variables", blank)
    assert sorted(restored["params"]["attention"]) == ["Block_0", "Block_1"]
    np.testing.assert_array_equal(apply(restored, X), want)


def test_a_rule_that_matches_nothing_fails_in_one_line():
    with pytest.raises(ValueError, match=r"after='Blok_\*' matches no submodule of CNN; its called submodules "
                                         r"are: Block_0 \(Block\), Block_0/Conv_0 \(Conv\)") as error:
        models.with_attention(CNN(), "cbam", after="Blok_*").init(jax.random.key(0), X, train=False)
    assert "\n" not in str(error.value)


def test_a_rule_that_matches_a_non_feature_map_fails_in_one_line():
    with pytest.raises(ValueError, match=r"matches 'Dense_0' \(Dense\), whose output \(2, 3\) is not a 4-D NHWC "
                                         "feature map; narrow the rule") as error:
        models.with_attention(CNN(), "cbam", after=["Block_*", nn.Dense]).init(jax.random.key(0), X, train=False)
    assert "\n" not in str(error.value)


def test_bad_attentions_and_rules_fail_before_any_tracing():
    with pytest.raises(ValueError, match="unknown attention 'cbma'; valid names: bam, cbam"):
        models.with_attention(CNN(), "cbma", after="Block_*")
    with pytest.raises(ValueError, match="takes no option 'ratio'"):
        models.with_attention(CNN(), "cbam", after="Block_*", ratio=2)
    with pytest.raises(ValueError, match="with_attention needs an attention"):
        models.with_attention(CNN(), None, after="Block_*")
    with pytest.raises(ValueError, match="after=3 is not a rule"):
        models.with_attention(CNN(), "cbam", after=3)


class Named(nn.Module):
    """A user's network with a submodule of its own named 'attention'."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3), name="attention")(x)


def test_a_submodule_named_like_the_wrappers_key_fails_in_one_line():
    with pytest.raises(ValueError, match="Named has a submodule or variable named 'attention', where the wrapper "
                                         "keeps its attention; rename it"):
        models.with_attention(Named(), "se", after="attention", reduction=2).init(jax.random.key(0), X)


class Outer(nn.Module):
    """A bigger network that holds a wrapped one."""

    @nn.compact
    def __call__(self, x):
        return models.with_attention(CNN(), Scale, after="Block_1")(x, train=False) + 1


def test_a_wrapped_network_inside_another_keeps_its_own_name():
    variables = Outer().init(jax.random.key(0), X)
    assert list(variables["params"]) == ["CNN_0"]
    assert sorted(variables["params"]["CNN_0"]) == ["Block_0", "Block_1", "Dense_0", "attention"]
    assert list(variables["params"]["CNN_0"]["attention"]) == ["Block_1"]


class Remat(nn.Module):
    """A user's network whose block runs under nn.remat (a lifted transform)."""

    @nn.compact
    def __call__(self, x):
        return nn.remat(Block, static_argnums=(2,))(4)(x, False)


def test_a_module_inside_a_lifted_transform_fails_in_one_line():
    with pytest.raises(ValueError, match=r"matches 'CheckpointBlock_0/bn' \(BatchNorm\), which runs inside a "
                                         "lifted transform"):
        models.with_attention(Remat(), "se", after=nn.BatchNorm, reduction=2).init(jax.random.key(0), X)


def test_the_module_built_directly_takes_a_single_rule_and_a_name():
    model = models.WithAttention(CNN(), "se", "Block_1")
    assert model.after == ("Block_1",) and model.attention == attention.factory("se")
    assert list(model.init(jax.random.key(0), X, train=False)["params"]["attention"]) == ["Block_1"]
