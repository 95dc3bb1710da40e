-- wrk reporter for bench/run: one machine-readable line at the end of a run.
-- RESULT <req/s> <p50 us> <p99 us> <non-2xx/3xx responses> <socket errors> <requests>
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %.1f %d %d %d %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50.0), latency:percentile(99.0),
    e.status, e.connect + e.read + e.write + e.timeout, summary.requests))
end
