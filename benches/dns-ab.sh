# A/B of two builds of the DNS example server over UDP (benches/dns.md): copy them to
# /tmp/dns-serve-before and /tmp/dns-serve-after, write /tmp/q.txt (benches/dns.md), then run this.
set -e
for round in 1 2; do
for v in before after; do
  /tmp/dns-serve-$v 127.0.0.1:5353 --nodes 20 --queries /tmp/q.txt > /tmp/dns-$v.log 2>&1 &
  pid=$!
  sleep 1
  qps=$(dnsperf -s 127.0.0.1 -p 5353 -d /tmp/q.txt -l 8 -c 4 -T 1 -q 200 2>&1 | awk '/Queries per second/ {print $4}')
  echo "round $round $v udp-mix qps=$qps"
  kill $pid; wait $pid 2>/dev/null || true
done
done
