"""Under the Hydra app, loggers created before it starts keep working (Hydra's
"disabled" job logging would switch them off, and their warnings with them)."""
import subprocess
import sys
import textwrap

APP = textwrap.dedent('''
    import logging
    import mtrain.train.lr  # its module logger exists before Hydra configures anything
    import hydra
    from mtrain.config.schema import register_configs

    register_configs()

    @hydra.main(config_path="pkg://mtrain.configs", config_name="config", version_base="1.3")
    def app(cfg):
        print("lr logger:", "disabled" if logging.getLogger("mtrain.train.lr").disabled else "enabled")

    app()
''')


def test_loggers_created_before_the_app_stay_enabled(tmp_path):
    out = subprocess.run([sys.executable, "-c", APP, f"run_dir={tmp_path}"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lr logger: enabled" in out.stdout
