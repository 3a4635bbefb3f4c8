"""The thread count a CPU run picks: the user's choice, else OMP_NUM_THREADS, else the cores that are not busy."""

import pytest

from trl_flow_grpo.cpu_threads import choose_cpu_threads


def test_an_idle_machine_uses_every_core_torch_would():
    assert choose_cpu_threads(None, cpu_count=2, load=0.1, default_threads=2, env={})[0] == 2


def test_a_busy_machine_uses_the_free_cores_and_never_zero():
    # One other job on 2 cores: one thread (torch's 2 would fight it for the cores, 5-8x slower on the demo).
    assert choose_cpu_threads(None, cpu_count=2, load=1.0, default_threads=2, env={})[0] == 1
    assert choose_cpu_threads(None, cpu_count=2, load=5.3, default_threads=2, env={})[0] == 1
    assert choose_cpu_threads(None, cpu_count=16, load=4.2, default_threads=16, env={})[0] == 12


def test_never_more_than_torchs_default():
    assert choose_cpu_threads(None, cpu_count=64, load=0.0, default_threads=8, env={})[0] == 8


def test_the_users_choice_wins_and_omp_num_threads_is_left_alone():
    assert choose_cpu_threads(3, cpu_count=2, load=1.9, default_threads=2, env={"OMP_NUM_THREADS": "1"})[0] == 3
    threads, reason = choose_cpu_threads(None, cpu_count=2, load=1.9, default_threads=2, env={"OMP_NUM_THREADS": "2"})
    assert threads is None and "OMP_NUM_THREADS=2" in reason
    assert choose_cpu_threads(None, cpu_count=2, load=None, default_threads=2, env={})[0] is None


def test_a_bad_choice_is_an_error_naming_it():
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        choose_cpu_threads(0, cpu_count=2, load=0.0, default_threads=2, env={})


def test_train_sets_the_chosen_threads_and_says_why(capsys):
    import torch

    from trl_flow_grpo.cli import _set_cpu_threads

    before = torch.get_num_threads()
    try:
        _set_cpu_threads(1)
        assert torch.get_num_threads() == 1
        assert "CPU threads: 1 (--num_threads 1" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
