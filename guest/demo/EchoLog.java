// Demo service for the handoff tests: a TCP line echo server that also appends every request line to a
// data file through one RandomAccessFile kept open (so its offset must survive a checkpoint/restore).
// Reply: "<line> <hostname> <file offset after the append>\n". The hostname is read per request, so a
// reply says which guest served it.
import java.io.*;
import java.net.*;
import java.nio.charset.StandardCharsets;
import java.nio.file.*;

public final class EchoLog {
    private static RandomAccessFile data;

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        data = new RandomAccessFile(args[1], "rw");
        data.seek(data.length());
        ServerSocket server = new ServerSocket();
        server.setReuseAddress(true);
        server.bind(new InetSocketAddress(port));
        while (true) {
            Socket s = server.accept();
            Thread t = new Thread(() -> serve(s));
            t.setDaemon(true);
            t.start();
        }
    }

    private static void serve(Socket s) {
        try (s;
             BufferedReader in = new BufferedReader(new InputStreamReader(s.getInputStream(), StandardCharsets.UTF_8));
             OutputStream out = s.getOutputStream()) {
            String line;
            while ((line = in.readLine()) != null) {
                long off;
                synchronized (EchoLog.class) {
                    data.write((line + "\n").getBytes(StandardCharsets.UTF_8));
                    off = data.getFilePointer();
                }
                String host = new String(Files.readAllBytes(Paths.get("/proc/sys/kernel/hostname")),
                        StandardCharsets.UTF_8).trim();
                out.write((line + " " + host + " " + off + "\n").getBytes(StandardCharsets.UTF_8));
                out.flush();
            }
        } catch (IOException e) {
            // Connection gone; the server keeps running.
        }
    }
}
