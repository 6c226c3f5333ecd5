"""A custom worker written the way the seed's "Create your own worker" section shows.

It is deliberately naive (it runs ramp-test inside ``submissions_dir`` and keeps stdout
and stderr in pipes, as RAMP's own CondaEnvWorker did): the point is that a worker
written to RAMP's documentation runs unchanged under this dispatcher.
"""

import logging
import os
import shutil
import subprocess
import sys

from runner.ramptest import traceback_of
from runner.worker import BaseWorker

logger = logging.getLogger("seed-worker")


class SeedStyleWorker(BaseWorker):
    def setup(self):
        # implement some initialization, e.g. launch an Openstack instance
        assert True
        # call the base class to update the status and log
        super().setup()

    def teardown(self):
        # clean some jobs done by the worker
        # call the base class to update the status and log
        super().teardown()

    def launch_submission(self):
        ramp_test = os.path.join(os.path.dirname(sys.executable), "ramp-test")
        cmd = [ramp_test, "--submission", self.submission,
               "--ramp-kit-dir", self.config["kit_dir"],
               "--ramp-data-dir", self.config["data_dir"],
               "--ramp-submission-dir", self.config["submissions_dir"],
               "--save-output"]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # call the base class to update the status and log
        super().launch_submission()

    def _is_submission_finished(self):
        """Status of the submission.

        The submission was launched in a subprocess. Calling ``poll()`` will
        indicate the status of this subprocess.
        """
        return False if self._proc.poll() is None else True

    def collect_results(self):
        # the base class will be in charge of checking that the state of
        # the worker is fine
        super().collect_results()
        stdout, stderr = self._proc.communicate()
        # write the prediction and logs at the location indicated by the
        # dispatcher (given by the config file)
        log_output = stdout + b'\n\n' + stderr
        error_msg = traceback_of(log_output.decode()) if self._proc.returncode else ""
        log_dir = os.path.join(self.config['logs_dir'],
                               self.submission)
        if not os.path.exists(log_dir):
            os.makedirs(log_dir)
        with open(os.path.join(log_dir, 'log'), 'wb+') as f:
            f.write(log_output)
        pred_dir = os.path.join(self.config['predictions_dir'],
                                self.submission)
        output_training_dir = os.path.join(
            self.config['submissions_dir'], self.submission,
            'training_output')
        if os.path.exists(pred_dir):
            shutil.rmtree(pred_dir)
        if self._proc.returncode == 0:
            shutil.copytree(output_training_dir, pred_dir)
        self.status = 'collected'
        logger.info(repr(self))
        return (self._proc.returncode, error_msg)
