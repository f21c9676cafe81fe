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

INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T23:52:35Z', '83e9ab4', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=49152,n_rows=1,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '11.865834', '0.000000', '15.441994', '192', '90112', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T23:52:36Z', '83e9ab4', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=49152,n_rows=8,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '12.997656', '0.000000', '112.778566', '1537', '81920', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T23:52:38Z', '83e9ab4', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=49152,n_rows=64,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '19.063008', '0.000000', '615.162936', '12296', '54580', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T23:52:39Z', '83e9ab4', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=151936,n_rows=1,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '12.631482', '0.000000', '44.819157', '593', '81920', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T23:52:40Z', '83e9ab4', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=151936,n_rows=8,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '20.767620', '0.000000', '218.082718', '4749', '49462', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T23:52:41Z', '83e9ab4', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=151936,n_rows=64,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '27.348524', '0.000000', '1324.841934', '37992', '37128', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T23:52:42Z', '83e9ab4', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=262144,n_rows=1,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '14.471381', '0.000000', '67.491081', '1024', '73728', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T23:52:43Z', '83e9ab4', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=262144,n_rows=8,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '23.292947', '0.000000', '335.445465', '8193', '45056', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-25T23:52:44Z', '83e9ab4', 'CUDA0', 'SAMPLE_SORTFREE', 'n_vocab=262144,n_rows=64,temp=0.800000,top_k=40,top_p=0.900000,min_p=0.050000,n_uniforms=33,special=0', 'perf', '1', '1', '', '45.572311', '0.000000', '1371.624673', '65544', '22016', '', '');
