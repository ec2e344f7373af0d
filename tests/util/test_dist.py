import pytest

from util.dist import DEFAULT_MASTER_PORT, elastic_restart_problem, expand_nodelist, resolve_env


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu-a1,gpu-b2", ["gpu-a1", "gpu-b2"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("rack1-[001-002]-ib,cpu5", ["rack1-001-ib", "rack1-002-ib", "cpu5"]),
    ("vm", ["vm"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_resolve_env_empty_is_single_process():
    info = resolve_env({})
    assert (info.rank, info.world_size, info.local_rank, info.source, info.distributed) == (0, 1, 0, "single", False)


def test_resolve_env_torchrun():
    info = resolve_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (3, 8, 3, "torchrun")
    assert (info.master_addr, info.master_port) == ("h", 1234)


def test_resolve_env_torchrun_wins_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert resolve_env(env).source == "torchrun"


def test_resolve_env_partial_torchrun_names_missing():
    with pytest.raises(RuntimeError, match="LOCAL_RANK missing"):
        resolve_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_resolve_env_slurm_master_from_nodelist():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "node[01-02]",
           "SLURM_JOB_ID": "4242"}
    info = resolve_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.source) == (3, 8, 3, "slurm")
    assert info.master_addr == "node01" and info.master_port == 15000 + 4242


def test_resolve_env_slurm_respects_existing_master():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "a[1-2]",
           "MASTER_ADDR": "b7", "MASTER_PORT": "999"}
    info = resolve_env(env)
    assert (info.master_addr, info.master_port) == ("b7", 999)


def test_resolve_env_slurm_single_task_is_single_process():
    assert not resolve_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "x"}).distributed


def test_resolve_env_openmpi_only_with_dist_on_itp():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert resolve_env(env).source == "single"
    info = resolve_env(env, dist_on_itp=True)
    assert (info.rank, info.world_size, info.source, info.master_port) == (1, 4, "openmpi", DEFAULT_MASTER_PORT)


def test_more_ranks_than_visible_gpus_is_an_error_naming_both():
    from util.dist import cuda_index
    from util.errors import SetupError

    assert [cuda_index(rank, 8) for rank in range(8)] == list(range(8))
    with pytest.raises(SetupError, match=r"local rank 2 has no GPU of its own: 2 GPU\(s\) are visible on this node"
                                         r".*--nproc_per_node 2"):
        cuda_index(2, 2)


AGENT = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "1", "GROUP_WORLD_SIZE": "2"}


@pytest.mark.parametrize("env, unsafe", [
    (AGENT, True),  # restarts across 2 nodes on the agents' shared store: the restart counts can differ
    ({**AGENT, "TORCHELASTIC_USE_AGENT_STORE": "False"}, False),  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    ({**AGENT, "GROUP_WORLD_SIZE": "1"}, False),  # one agent counts every restart
    ({**AGENT, "TORCHELASTIC_MAX_RESTARTS": "0"}, False),  # no restart
    ({}, False),  # not torchrun
])
def test_multinode_restarts_on_a_shared_store_are_named_with_the_fix(env, unsafe):
    problem = elastic_restart_problem(env)
    assert (problem is not None) == unsafe
    if unsafe:
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in problem and "--max-restarts 1 across 2 nodes" in problem
