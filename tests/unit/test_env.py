from mtrain.parallel.env import detect_env, first_host


def test_torchrun_variables():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 1, "h0", 1234)
    assert env.launcher == "torchrun"


def test_slurm_variables():
    env = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "gpu[007-009,012],cpu1", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 16, 1, "gpu007")
    assert env.launcher == "slurm" and env.master_port == 29500 + 4242


def test_first_host_forms():
    assert first_host("n1") == "n1"
    assert first_host("n[1-2]") == "n1"
    assert first_host("node-a,node-b") == "node-a"
    assert first_host("rack1-[3,5-7]") == "rack1-3"


def test_single_process_default():
    env = detect_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_ranks_per_node_and_the_nodes_an_ep_group_spans():
    from mtrain.parallel.env import ep_nodes, ranks_per_node

    assert ranks_per_node({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert ranks_per_node({"SLURM_NTASKS_PER_NODE": "4(x2)"}) == 4
    assert ranks_per_node({}) is None
    assert ep_nodes(64, 1, 8) == 8  # DeepSeek-V3: EP64 over 8 nodes of 8 GPUs
    assert ep_nodes(8, 2, 8) == 2  # tp=2 leaves 4 EP ranks per node
    assert ep_nodes(4, 1, None) == 1  # unknown: one node
    assert ep_nodes(4, 1, 4, ep_ranks_per_node=2) == 2  # 4 CPU ranks studied as 2 nodes x 2


def test_max_nodes_per_token_must_divide_top_k():
    from mtrain.config.loading import load_config
    from mtrain.train.preflight import config_errors

    errors = config_errors(load_config(["model.max_nodes_per_token=3"]))  # tiny: top-2
    assert any("model.max_nodes_per_token=3 must divide model.moe_topk=2" in e for e in errors)
