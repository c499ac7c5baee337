"""CALVIN's evaluation protocol: our chains, start states and instructions against CALVIN's own files.

``../shared/third_party/calvin/`` holds CALVIN's ``multistep_sequences.py`` and
``new_playtable_validation.yaml``; the tests skip when it is absent. CALVIN's module imports
``temp_seed`` from ``calvin_agent.evaluation.utils``, which also imports torch models, pyhash and
cv2; the test registers a ``calvin_agent.evaluation.utils`` holding only ``temp_seed``, written as
CALVIN's, so the real ``get_sequences`` runs unchanged.
"""

import contextlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest

from mimictest.chained import CATEGORIES, INSTRUCTIONS, TASK_RULES, TASKS, condition_state, fnv1_32, get_sequences

CALVIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "third_party", "calvin", "calvin_models")
SEQUENCES = os.path.join(CALVIN, "calvin_agent", "evaluation", "multistep_sequences.py")
NUM = 100  # chains compared (CALVIN's 1000 take about 2 minutes of its own code on 2 cores; they were equal too)


@pytest.fixture(scope="module")
def calvin_sequences():
    if not os.path.isfile(SEQUENCES):
        pytest.skip(f"CALVIN's protocol files are not at {CALVIN}")

    @contextlib.contextmanager
    def temp_seed(seed):
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)

    saved = {k: sys.modules.get(k) for k in ("calvin_agent", "calvin_agent.evaluation", "calvin_agent.evaluation.utils",
                                             "calvin_agent.evaluation.multistep_sequences")}
    sys.modules["calvin_agent"] = types.ModuleType("calvin_agent")
    sys.modules["calvin_agent.evaluation"] = types.ModuleType("calvin_agent.evaluation")
    utils = types.ModuleType("calvin_agent.evaluation.utils")
    utils.temp_seed = temp_seed
    sys.modules["calvin_agent.evaluation.utils"] = utils
    name = "calvin_agent.evaluation.multistep_sequences"
    spec = importlib.util.spec_from_file_location(name, SEQUENCES)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its worker processes unpickle functions by module name
    spec.loader.exec_module(module)
    yield module
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


def test_task_table_equals_calvins(calvin_sequences):
    assert list(calvin_sequences.tasks) == list(TASKS)
    assert calvin_sequences.task_categories == CATEGORIES
    for name in TASKS:
        assert calvin_sequences.tasks[name] == [{"condition": c, "effect": e} for c, e in TASK_RULES[name][1]], name


def test_sequences_equal_calvins_in_order(calvin_sequences):
    theirs = calvin_sequences.get_sequences(NUM, num_workers=2)
    ours = get_sequences(NUM)
    assert len(ours) == len(theirs) == NUM
    for (their_state, their_chain), (state, chain) in zip(theirs, ours):
        assert state == their_state
        assert chain == tuple(their_chain)


def test_instructions_equal_calvins_validation_file():
    path = os.path.join(CALVIN, "conf", "annotations", "new_playtable_validation.yaml")
    if not os.path.isfile(path):
        pytest.skip(f"no {path}")
    from omegaconf import OmegaConf

    theirs = {k: v[0] for k, v in OmegaConf.to_container(OmegaConf.load(path)).items()}
    assert theirs == INSTRUCTIONS


def test_subset_chains_use_only_the_subset_and_are_valid():
    subset = ["open_drawer", "close_drawer", "move_slider_left", "move_slider_right", "turn_on_led", "turn_off_led",
              "lift_red_block_table", "push_red_block_right", "push_blue_block_left"]
    chains = get_sequences(40, tasks=subset)
    assert len(chains) == 40
    for state, chain in chains:
        assert set(chain) <= set(subset) and len({CATEGORIES[t] for t in chain}) == 5
    with pytest.raises(ValueError, match="no chain"):
        get_sequences(5, tasks=["open_drawer", "close_drawer"])


def test_fnv1_32_matches_pyhash_documentation():
    assert fnv1_32(b"hello world") == 2805756500  # pyhash's README: fnv1_32()('hello world')


def test_condition_state_places_drawer_slider_lights_and_blocks():
    state = {"led": 1, "lightbulb": 1, "slider": "left", "drawer": "open", "red_block": "slider_right",
             "blue_block": "table", "pink_block": "table", "grasped": 0}
    robot, scene = condition_state(state)
    assert robot.shape == (15,) and scene.shape == (24,)
    assert scene[:6].tolist() == [0.28, 0.22, 0.0, 0.088, 1.0, 1.0]
    assert np.allclose(scene[6:9], [7.03416330e-02, 9.24044687e-02, 4.60990009e-01])
    table = {tuple(np.round(scene[12:15], 3)), tuple(np.round(scene[18:21], 3))}
    assert table == {(0.05, -0.12, 0.46), (0.23, -0.12, 0.46)}  # both table slots, one block each
    yaw = scene[[11, 17, 23]]
    assert np.all((yaw > np.pi / 2 - np.pi / 8) & (yaw < np.pi / 2 + np.pi / 8))
    assert np.array_equal(condition_state(state)[1], scene)  # deterministic per condition
