CREATE TABLE IF NOT EXISTS test_backend_ops (
  test_time TEXT,
  build_commit TEXT,
  backend_name TEXT,
  op_name TEXT,
  op_params TEXT,
  test_mode TEXT,
  supported INTEGER,
  passed INTEGER,
  error_message TEXT,
  time_us REAL,
  flops REAL,
  bandwidth_gb_s REAL,
  memory_kb INTEGER,
  n_runs INTEGER,
  device_description TEXT,
  backend_reg_name TEXT
);

INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T19:28:58Z', '44adbf8', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=49152,n_rows=1,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '26.051733', '0.000000', '7.033395', '192', '40960', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T19:28:59Z', '44adbf8', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=49152,n_rows=8,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '26.488550', '0.000000', '55.339271', '1537', '40960', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T19:29:00Z', '44adbf8', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=49152,n_rows=64,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '34.411839', '0.000000', '340.779700', '12296', '30019', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T19:29:01Z', '44adbf8', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=151936,n_rows=1,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '22.819356', '0.000000', '24.809305', '593', '49152', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T19:29:02Z', '44adbf8', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=151936,n_rows=8,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '44.409921', '0.000000', '101.983045', '4749', '28264', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T19:29:03Z', '44adbf8', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=151936,n_rows=64,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '47.641261', '0.000000', '760.527124', '37992', '21216', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T19:29:05Z', '44adbf8', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=262144,n_rows=1,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '25.283643', '0.000000', '38.629290', '1024', '40960', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T19:29:06Z', '44adbf8', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=262144,n_rows=8,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '46.661987', '0.000000', '167.449218', '8193', '24576', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T19:29:07Z', '44adbf8', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=262144,n_rows=64,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '73.294994', '0.000000', '852.829131', '65544', '13824', '', '');
