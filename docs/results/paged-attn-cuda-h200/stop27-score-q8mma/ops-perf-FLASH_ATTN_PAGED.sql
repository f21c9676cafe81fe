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

INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-27T14:47:56Z', '6a631c4', 'CUDA0', 'FLASH_ATTN_PAGED', 'hsk=128,hsv=128,nh=8,nr=4,kv=32768,nb=1,n_seq=1,page_size=64,type_KV=q8_kv,uneven=0,sinks=0,max_bias=0.000000,logit_softcap=0.000000,n_swa=0,seq_runs=1,prec_q8=1', 'perf', '1', '1', '', '37.837991', '14188673995768.101562', '0.000000', '85824', '26554', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-27T14:48:01Z', '6a631c4', 'CUDA0', 'FLASH_ATTN_PAGED', 'hsk=128,hsv=128,nh=8,nr=4,kv=32768,nb=8,n_seq=8,page_size=64,type_KV=q8_kv,uneven=0,sinks=0,max_bias=0.000000,logit_softcap=0.000000,n_swa=0,seq_runs=1,prec_q8=1', 'perf', '1', '1', '', '208.112355', '20637733392736.968750', '0.000000', '686481', '4824', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-27T14:48:03Z', '6a631c4', 'CUDA0', 'FLASH_ATTN_PAGED', 'hsk=128,hsv=128,nh=8,nr=4,kv=65536,nb=1,n_seq=1,page_size=64,type_KV=q8_kv,uneven=0,sinks=0,max_bias=0.000000,logit_softcap=0.000000,n_swa=0,seq_runs=1,prec_q8=1', 'perf', '1', '1', '', '62.473498', '17187157205868.556641', '0.000000', '171600', '16074', '', '');
INSERT INTO test_backend_ops (test_time, build_commit, backend_name, op_name, op_params, test_mode, supported, passed, error_message, time_us, flops, bandwidth_gb_s, memory_kb, n_runs, device_description, backend_reg_name) VALUES ('2026-11-27T14:48:12Z', '6a631c4', 'CUDA0', 'FLASH_ATTN_PAGED', 'hsk=128,hsv=128,nh=8,nr=4,kv=65536,nb=8,n_seq=8,page_size=64,type_KV=q8_kv,uneven=0,sinks=0,max_bias=0.000000,logit_softcap=0.000000,n_swa=0,seq_runs=1,prec_q8=1', 'perf', '1', '1', '', '401.441106', '21397745443980.371094', '0.000000', '1372689', '2496', '', '');
