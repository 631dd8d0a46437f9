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
