package main

// selftest: what the generator costs. Starts `serve` (the trivial echo server)
// pinned to -server-cpu, runs this binary's echo mode pinned to -gen-cpu for
// each -configs setting (and -gen, an older generator, in the same run, the
// two alternating), and prints CPU per round trip of generator and server.
//
//	taskset is used when present (util-linux); without it nothing is pinned.

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

func visitFlags(fn func(name string)) { flag.Visit(func(f *flag.Flag) { fn(f.Name) }) }

func pinned(cpu string, argv ...string) *exec.Cmd {
	if ts, err := exec.LookPath("taskset"); err == nil {
		return exec.Command(ts, append([]string{"-c", cpu}, argv...)...)
	}
	return exec.Command(argv[0], argv[1:]...)
}

type stRow struct {
	gen                      string
	cfg                      string
	rps, genUs, genFrac      float64
	srvUs, srvFrac, p50, p99 float64
	err                      string
}

func runSelftest() int {
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "selftest:", err)
		return 1
	}
	srv := pinned(*flagServerCPU, self, "-mode=serve", "-addr=127.0.0.1:0", "-hold=30m")
	out, _ := srv.StdoutPipe()
	srv.Stderr = os.Stderr
	if err := srv.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "selftest: serve:", err)
		return 1
	}
	defer func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() }()
	sc := bufio.NewScanner(out)
	port := ""
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) == 3 && f[1] == "listening" {
			port = f[2]
			break
		}
	}
	if port == "" {
		fmt.Fprintln(os.Stderr, "selftest: serve did not start")
		return 1
	}
	addr := "127.0.0.1:" + port
	pid := srv.Process.Pid
	gens := []string{self}
	if *flagGen != "" {
		gens = append(gens, *flagGen)
	}
	fmt.Printf("selftest: trivial echo server (pid %d) on cpu %s, generator on cpu %s; %v warm-up, %v measured\n",
		pid, *flagServerCPU, *flagGenCPU, *flagWarmup, *flagDuration)
	var rows []stRow
	for _, cfg := range strings.Split(*flagConfigs, ",") {
		ck := strings.SplitN(cfg, "x", 2)
		if len(ck) != 2 {
			fmt.Fprintln(os.Stderr, "selftest: -configs wants CxK,...")
			return 2
		}
		for run := 0; run < *flagRuns; run++ {
			for gi := range gens {
				g := gens[(gi+run)%len(gens)]
				row := selftestRun(g, g == self, addr, pid, ck[0], ck[1])
				row.cfg = "C=" + ck[0] + " K=" + ck[1]
				rows = append(rows, row)
				printRow(row)
			}
		}
	}
	return 0
}

func printRow(r stRow) {
	if r.err != "" {
		fmt.Printf("%-16s %-12s ERROR %s\n", r.gen, r.cfg, r.err)
		return
	}
	fmt.Printf("%-16s %-12s %9.0f rt/s  generator %5.2f us/rt (%3.0f%% of its core)  server %5.2f us/rt (%3.0f%%)  p50 %6.0f us  p99 %6.0f us\n",
		r.gen, r.cfg, r.rps, r.genUs, r.genFrac*100, r.srvUs, r.srvFrac*100, r.p50, r.p99)
}

// selftestRun runs one generator; the server's CPU is sampled here, on the
// generator's events, for old and new alike.
func selftestRun(gen string, isSelf bool, addr string, pid int, c, k string) stRow {
	name := "new"
	if !isSelf {
		name = filepath.Base(gen)
	}
	args := []string{gen, "-mode=echo", "-addr=" + addr, "-c=" + c, "-k=" + k,
		"-warmup=" + flagWarmup.String(), "-duration=" + flagDuration.String()}
	if isSelf {
		args = append(args, "-wait="+*flagWait, "-tick="+flagTick.String())
	}
	cmd := pinned(*flagGenCPU, args...)
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return stRow{gen: name, err: err.Error()}
	}
	var cpu0, cpu1 float64
	var t0, t1 time.Time
	var res map[string]any
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "EVENT measure_start":
			cpu0, _ = procCPU(pid)
			t0 = time.Now()
		case line == "EVENT measure_end":
			cpu1, _ = procCPU(pid)
			t1 = time.Now()
		case strings.HasPrefix(line, "RESULT "):
			json.Unmarshal([]byte(line[7:]), &res)
		}
	}
	cmd.Wait()
	if res == nil {
		return stRow{gen: name, err: "no result"}
	}
	if e, ok := res["error"].(string); ok {
		return stRow{gen: name, err: e}
	}
	f := func(k string) float64 { v, _ := res[k].(float64); return v }
	msgs, secs := f("msgs"), f("secs")
	srv := cpu1 - cpu0
	wall := t1.Sub(t0).Seconds()
	if msgs == 0 || secs == 0 || wall <= 0 {
		return stRow{gen: name, err: "nothing measured"}
	}
	return stRow{gen: name, rps: msgs / secs, genUs: f("gen_cpu_s") / msgs * 1e6, genFrac: f("gen_cpu_frac"),
		srvUs: srv / msgs * 1e6, srvFrac: srv / wall, p50: f("p50_us"), p99: f("p99_us")}
}
